"""A small immutable element tree for stanzas.

An `Element` has a namespace, a local name, attributes and children. Children are
elements or text, in document order, so mixed content (XHTML-IM bodies) survives a round
trip. Attribute keys are the local name for attributes in no namespace, and Clark
notation `{ns}local` for namespaced ones (`xml:lang` is `{XML}lang`, see `XML_LANG`).

Elements are never mutated after construction: routing code that needs another `to` or
`from` makes a shallow copy with `replace_attrs`, which shares the children. This keeps
"one parse per stanza" cheap and lets one element be delivered to several sessions.

Memory accounting (STYLE P3). `Element.size` estimates the bytes an element and its
subtree hold in this process (CPython objects, not wire bytes: an empty `<a/>` is 4 bytes
on the wire and about 200 in memory). Queues and buffers that hold elements are bounded
with it, and the parser applies the same costs to a stanza it is still building, so one
figure means the same thing everywhere. The costs were measured with tracemalloc on
CPython 3.11 (64-bit) and round up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from gateway.xmpp import namespaces as ns

XML_LANG: Final = "{" + ns.XML + "}lang"

#: Bytes one element holds besides its attributes, children and the characters of its name
#: and namespace: the object, its attribute dict and child tuple, two string headers.
ELEMENT_COST: Final = 200
#: Bytes one attribute holds besides its name and value characters (two strings, a slot).
ATTRIBUTE_COST: Final = 100
#: Bytes one text child holds besides its characters (a string object and a slot).
TEXT_COST: Final = 56


def attributes_cost(attrs: Mapping[str, str]) -> int:
    """The estimated bytes held by `attrs` (see the module docstring)."""
    # map/len run in C: this is on every stanza's path.
    return ATTRIBUTE_COST * len(attrs) + sum(map(len, attrs)) + sum(map(len, attrs.values()))


class Element:
    """An immutable XML element.

    Args:
        namespace: the namespace URI ("" for none).
        name: the local name.
        attrs: attribute values by key (see module docstring); copied.
        children: child elements and text nodes, in order.
    """

    __slots__ = ("_size", "attrs", "children", "name", "namespace")

    _size: int
    namespace: str
    name: str
    attrs: Mapping[str, str]
    children: tuple[Element | str, ...]

    def __init__(
        self,
        namespace: str,
        name: str,
        attrs: Mapping[str, str] | None = None,
        children: Iterable[Element | str] = (),
    ) -> None:
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "attrs", dict(attrs) if attrs else {})
        object.__setattr__(self, "children", tuple(children))
        object.__setattr__(self, "_size", -1)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Element is immutable")

    @property
    def tag(self) -> tuple[str, str]:
        """`(namespace, local name)`."""
        return (self.namespace, self.name)

    @property
    def size(self) -> int:
        """The estimated bytes this element and its subtree hold in memory (see the module
        docstring); computed once, children shared with copies keep theirs."""
        size: int = self._size
        if size < 0:
            attrs = self.attrs
            size = ELEMENT_COST + len(self.namespace) + len(self.name)
            if attrs:
                size += attributes_cost(attrs)
            for child in self.children:
                size += child.size if isinstance(child, Element) else TEXT_COST + len(child)
            object.__setattr__(self, "_size", size)
        return size

    @property
    def text(self) -> str:
        """The concatenated direct text children."""
        parts = [c for c in self.children if isinstance(c, str)]
        return "".join(parts)

    def get(self, key: str, default: str | None = None) -> str | None:
        """An attribute's value, or `default`."""
        return self.attrs.get(key, default)

    def elements(self) -> Iterator[Element]:
        """The child elements, skipping text."""
        for c in self.children:
            if isinstance(c, Element):
                yield c

    def find(self, namespace: str, name: str | None = None) -> Element | None:
        """The first child element in `namespace` (and with `name`, when given), or None."""
        for c in self.children:
            if (
                isinstance(c, Element)
                and c.namespace == namespace
                and (name is None or c.name == name)
            ):
                return c
        return None

    def find_all(self, namespace: str, name: str | None = None) -> list[Element]:
        """Every child element in `namespace` (and with `name`, when given)."""
        return [
            c
            for c in self.children
            if isinstance(c, Element)
            and c.namespace == namespace
            and (name is None or c.name == name)
        ]

    def find_text(self, namespace: str, name: str) -> str | None:
        """The text of the first matching child, or None when there is none."""
        child = self.find(namespace, name)
        return None if child is None else child.text

    def replace_attrs(self, **changes: str | None) -> Element:
        """A shallow copy with attributes set (a value of None removes the attribute)."""
        attrs = dict(self.attrs)
        for key, value in changes.items():
            if value is None:
                attrs.pop(key, None)
            else:
                attrs[key] = value
        return Element(self.namespace, self.name, attrs, self.children)

    def with_children(self, children: Iterable[Element | str]) -> Element:
        """A copy with the same name and attributes and other children."""
        return Element(self.namespace, self.name, self.attrs, children)

    def append(self, *children: Element | str) -> Element:
        """A copy with `children` added at the end."""
        return Element(self.namespace, self.name, self.attrs, self.children + children)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Element):
            return NotImplemented
        return (
            self.namespace == other.namespace
            and self.name == other.name
            and self.attrs == other.attrs
            and self.children == other.children
        )

    def __hash__(self) -> int:
        return hash((self.namespace, self.name))

    def __repr__(self) -> str:
        attrs = dict(self.attrs)
        return f"<Element {{{self.namespace}}}{self.name} {attrs!r} children={len(self.children)}>"
