"""Embedded default models with known ground truth (testbeds)."""

from memctl.zoo.testbed import Testbed, assets_dir, load_testbed

__all__ = ["Testbed", "assets_dir", "load_testbed"]
