"""JID parsing, validation and normalisation (RFC 7622)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import JIDError
from gateway.xmpp.jid import JID


@pytest.mark.parametrize(
    ("text", "local", "domain", "resource"),
    [
        ("example.com", None, "example.com", None),
        ("juliet@example.com", "juliet", "example.com", None),
        ("juliet@example.com/balcony", "juliet", "example.com", "balcony"),
        ("example.com/resource", None, "example.com", "resource"),
        # RFC 7622 section 3.1: the resourcepart starts at the first "/", and may hold "@"
        # and "/".
        ("juliet@example.com/foo@bar/baz", "juliet", "example.com", "foo@bar/baz"),
        ("example.com/juliet@example.net", None, "example.com", "juliet@example.net"),
        # RFC 7622 section 3.5 examples.
        ("juliet@example.com/foo bar", "juliet", "example.com", "foo bar"),
        ("\u03c0@example.com", "\u03c0", "example.com", None),
        ("server/resource@foo", None, "server", "resource@foo"),
        ("1.2.3.4", None, "1.2.3.4", None),
        ("user@[::1]/r", "user", "[::1]", "r"),
    ],
)
def test_valid_jids_split_into_parts(
    text: str, local: str | None, domain: str, resource: str | None
) -> None:
    jid = JID.parse(text)
    assert (jid.local, jid.domain, jid.resource) == (local, domain, resource)
    assert str(jid) == text


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Juliet@Example.COM/Balcony", "juliet@example.com/Balcony"),
        ("juliet@example.com.", "juliet@example.com"),
        ("juliet@example.com./r", "juliet@example.com/r"),
        ("J\u00dcLIET@example.com", "j\u00fcliet@example.com"),
        # Full-width characters map to their ASCII forms (PRECIS width mapping, RFC 5895).
        (
            "\uff4a\uff55\uff4c\uff49\uff45\uff54@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
            "juliet@example.com",
        ),
        # A-labels become U-labels (RFC 7622 section 3.2.2), case-insensitively.
        ("user@XN--BCHER-KVA.example", "user@b\u00fccher.example"),
        ("user@B\u00dcCHER.example", "user@b\u00fccher.example"),
        # The ideographic full stop separates labels.
        ("user@\u4f8b\u5b50\u3002\u6d4b\u8bd5", "user@\u4f8b\u5b50.\u6d4b\u8bd5"),
        # NFC: "u" + combining diaeresis is "u-umlaut".
        ("u\u0308ser@example.com", "\u00fcser@example.com"),
        ("user@[0:0:0:0:0:0:0:1]", "user@[::1]"),
        ("user@[2001:DB8::1]", "user@[2001:db8::1]"),
    ],
)
def test_parts_are_normalised(text: str, normalised: str) -> None:
    assert str(JID.parse(text)) == normalised


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@example.com",
        "juliet@",
        "juliet@/r",
        "example.com/",
        "juliet@example.com/",
        "/resource",
        ".",
        "example..com",
        ".example.com",
        "example.com..",
        "exa mple.com",
        "exa!mple.com",
        "-example.com",
        "example-.com",
        "a@b@example.com",
        "xn--zz.example",
        "user@\u2603.com",  # a symbol is not a valid U-label code point
        "user@[::1",
        "user@[not-an-address]",
        "user@[fe80::1%eth0]",
        "user@[1.2.3.4]",
        'ju"liet@example.com',
        "ju&liet@example.com",
        "ju'liet@example.com",
        "ju:liet@example.com",
        "ju<liet@example.com",
        "ju>liet@example.com",
        "jul iet@example.com",
        "juliet\u00a0@example.com",
        "juliet\x00@example.com",
        # RFC 7622 section 3.5 lists a chess symbol as a valid localpart, but PRECIS
        # IdentifierClass (RFC 8264 section 9.15) disallows symbols.
        "\u265a@example.com",
        "juliet@example.com/\x00",
        "juliet@example.com/\x07",
        "\ud800@example.com",
        "juliet@example.com/\udfff",
        "a" * 64 + ".com",
    ],
)
def test_invalid_jids_raise_jid_error(text: str) -> None:
    with pytest.raises(JIDError):
        JID.parse(text)


def test_errors_give_a_reason() -> None:
    with pytest.raises(JIDError, match="empty localpart"):
        JID.parse("@example.com")
    with pytest.raises(JIDError, match="empty resourcepart"):
        JID.parse("example.com/")
    with pytest.raises(JIDError, match=r"3\.3\.1"):
        JID.parse("a:b@example.com")


def test_refusals_are_repeated_from_the_cache() -> None:
    for _ in range(2):
        with pytest.raises(JIDError, match="empty localpart"):
            JID.parse("@cached.example")


def test_parts_up_to_1023_octets_are_accepted() -> None:
    local = "a" * 1023
    resource = "\u00e9" * 511 + "r"  # 1023 octets of UTF-8
    domain = ".".join(["b" * 63] * 16)  # 16 * 64 - 1 = 1023 octets
    jid = JID.parse(f"{local}@{domain}/{resource}")
    assert (jid.local, jid.domain, jid.resource) == (local, domain, resource)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 1024 + "@example.com",
        "juliet@example.com/" + "r" * 1024,
        "juliet@example.com/" + "\u00e9" * 512,
        ".".join(["b" * 63] * 16) + ".c",
        "x" * 20000,
    ],
)
def test_parts_over_1023_octets_are_refused(text: str) -> None:
    with pytest.raises(JIDError):
        JID.parse(text)


@pytest.mark.parametrize(
    ("local", "domain", "resource"),
    [("a" * 10000, "example.com", None), (None, "a" * 10000, None), (None, "a.b", "r" * 10000)],
)
def test_make_refuses_huge_parts_before_unicode_work(
    local: str | None, domain: str, resource: str | None
) -> None:
    with pytest.raises(JIDError, match="too long"):
        JID.make(local, domain, resource)


def test_parse_caches_results() -> None:
    assert JID.parse("romeo@example.net/orchard") is JID.parse("romeo@example.net/orchard")


def test_long_strings_parse_without_the_cache() -> None:
    text = "juliet@example.com/" + "r" * 500
    assert JID.parse(text) == JID.parse(text)


def test_make_validates_and_normalises_each_part() -> None:
    assert JID.make("Juliet", "Example.COM.", "Balcony") == JID.parse("juliet@example.com/Balcony")
    assert JID.make(None, "example.com") == JID.parse("example.com")
    with pytest.raises(JIDError):
        JID.make("a@b", "example.com")
    with pytest.raises(JIDError):
        JID.make("juliet", "example.com", "")
    with pytest.raises(JIDError):
        JID.make("", "example.com")
    with pytest.raises(JIDError):
        JID.make("juliet", "bad domain")


def test_bare_and_with_resource() -> None:
    full = JID.parse("juliet@example.com/balcony")
    bare = full.bare()
    assert bare == JID.parse("juliet@example.com")
    assert bare.is_bare
    assert not full.is_bare
    assert bare.bare() is bare
    assert bare.with_resource("Chamber") == JID.parse("juliet@example.com/Chamber")
    assert full.with_resource("x").bare() == bare
    with pytest.raises(JIDError):
        bare.with_resource("")
    with pytest.raises(JIDError):
        bare.with_resource("\x00")


def test_jids_are_immutable_and_hashable() -> None:
    jid = JID.parse("juliet@example.com/balcony")
    with pytest.raises(dataclasses.FrozenInstanceError):
        jid.local = "romeo"  # type: ignore[misc]
    assert {jid, JID.parse("Juliet@EXAMPLE.com/balcony")} == {jid}
    assert jid != JID.parse("juliet@example.com/Balcony")


@given(st.text(max_size=40))
def test_parse_either_refuses_or_round_trips(text: str) -> None:
    try:
        jid = JID.parse(text)
    except JIDError:
        return
    assert JID.parse(str(jid)) == jid
    assert JID.make(jid.local, jid.domain, jid.resource) == jid


_LOCAL_CHARS = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc", "Zs"), exclude_characters="\"&'/:<>@"
)


@given(
    local=st.text(_LOCAL_CHARS, min_size=1, max_size=10),
    labels=st.lists(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4
    ),
    resource=st.text(min_size=1, max_size=10),
)
def test_parse_of_joined_valid_parts_keeps_them(
    local: str, labels: list[str], resource: str
) -> None:
    domain = ".".join(labels)
    try:
        expected = JID.make(local, domain, resource)
    except JIDError:
        return  # PRECIS refuses some code points; that is its business
    assert JID.parse(f"{local}@{domain}/{resource}") == expected
    assert expected.domain == domain
