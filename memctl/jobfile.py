"""Reading a job file strictly: JSON and YAML that refuse duplicate keys (instead of keeping the last one), and
YAML that refuses aliases (`*name`) except as merge keys (`<<: *defaults`).

    >>> parse_yaml("a: 1\\nb: [2, 3]")
    {'a': 1, 'b': [2, 3]}
    >>> parse_json('{"a": 1, "a": 2}')
    Traceback (most recent call last):
    ...
    ValueError: duplicate key(s) ['a']
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import yaml

from memctl.options import short_repr

__all__ = ["StrictLoader", "got", "parse_json", "parse_yaml"]


def got(value: Any) -> str:
    """A value read from a job file, as an error message names it."""
    return "null" if value is None else f"{type(value).__name__} {short_repr(value)}"


def parse_yaml(text: str) -> Any:
    """YAML through `StrictLoader`; raises `yaml.YAMLError`."""
    return yaml.load(text, Loader=StrictLoader)


def parse_json(text: str) -> Any:
    def no_duplicates(pairs):
        dup = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        if dup:
            raise ValueError(f"duplicate key(s) {short_repr(dup)}")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=no_duplicates)


_MERGE = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects duplicate keys (instead of keeping the last one) and aliases (`*name`) except
    as merge keys (`<<: *defaults`): an alias of an alias of a list ("billion laughs") would expand exponentially."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            check_aliases(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeConstructor says so
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def check_aliases(root: yaml.Node) -> None:
    """Walk the node graph in document order; a node met again is an alias, allowed only as a merge key's value."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, merge = stack.pop()
        if id(node) in seen:
            if not merge:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "Expected no aliases (*name) except as a merge key (<<: *name), but the anchor "
                    "defined here is used elsewhere",
                    node.start_mark,
                )
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, merge) for child in reversed(node.value))  # a merge list holds aliases
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack.append((value, key.tag == _MERGE))
                stack.append((key, False))
