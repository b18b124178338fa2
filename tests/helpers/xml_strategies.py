"""Hypothesis strategies for XML text, names, attributes and Elements (shared by the
serializer and framing property tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element

_NOT_XML = "".join(chr(c) for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)) + "\ufffe\uffff"

xml_chars = st.one_of(
    st.sampled_from("&<>\"'\t\n\r] ;="),
    st.characters(exclude_categories=["Cs"], exclude_characters=_NOT_XML),
)
xml_text = st.text(xml_chars, min_size=1, max_size=12)

# XML names; nothing starting with "xml" (reserved), so no first letter x.
name_start = st.sampled_from("abcdefghijklmnopqrstuvwyzABCZ_\u00e9\u00fc\u0436\u4e2d")
name_rest = st.text(st.sampled_from("abcxyz0189-._\u00e9\u0436\u4e2d\u00b7"), max_size=6)
xml_names = st.builds(lambda first, rest: first + rest, name_start, name_rest)

attribute_namespaces = st.sampled_from(["", "urn:a", "urn:other", "urn:q&<'\"", ns.XML])
attribute_keys = st.builds(
    lambda uri, local: "{" + uri + "}" + local if uri else local, attribute_namespaces, xml_names
)
attributes = st.dictionaries(attribute_keys, st.text(xml_chars, max_size=10), max_size=4)


def normalised(children: list[Element | str]) -> list[Element | str]:
    """Join adjacent text children, as the parser does."""
    out: list[Element | str] = []
    for child in children:
        if isinstance(child, str) and out and isinstance(out[-1], str):
            out[-1] += child
        else:
            out.append(child)
    return out


def element(
    namespaces: st.SearchStrategy[str],
    names: st.SearchStrategy[str],
    children: st.SearchStrategy[list[Element | str]],
) -> st.SearchStrategy[Element]:
    """Elements with the given namespaces, names and children, and any attributes."""
    return st.builds(
        lambda namespace, name, attrs, kids: Element(namespace, name, attrs, normalised(kids)),
        namespaces,
        names,
        attributes,
        children,
    )
