"""The pyexpat parser under `StreamParser`, set up for restricted XML (RFC 6120 section 11.1).

We call pyexpat directly rather than through defusedxml because defusedxml has no incremental
namespace-aware parser that also reports comments and processing instructions. The same rules
defusedxml applies with `forbid_dtd=True, forbid_entities=True, forbid_external=True` are
enforced here by handlers that raise `restricted-xml`: DOCTYPE (and so any internal subset),
entity, unparsed-entity and notation declarations, external entity references; also comments
and processing instructions. Parameter entities are never parsed. Without a DTD only the five
predefined entities and character references exist; any other reference is a well-formedness
error. An XML declaration naming an encoding other than UTF-8 is `unsupported-encoding`; the
parser itself is forced to UTF-8.

`new_expat_parser` returns a parser with all of that installed; the caller
(`gateway.xmpp.parser`) adds the handlers that build events: start and end tags, text and
namespace declarations. The refusal handlers are module-level functions, so a parser costs
no bound-method objects for them.
"""

from __future__ import annotations

from typing import Final

# Hardened at handler level (see the module docstring): every DTD, entity, PI and comment
# hook raises, parameter entities are off. defusedxml offers no incremental
# namespace-aware pyexpat with comment/PI hooks, so it cannot be used here.
from xml.parsers import expat

from gateway.errors import RemoteProtocolError, StreamErrorCondition

#: Size of pyexpat's text buffer, allocated per parser (an idle parser is ~14 KB, most of it
#: expat's own tables); longer text arrives in several callbacks and is joined by the caller.
_TEXT_BUFFER_SIZE: Final = 1024


def new_expat_parser(namespace_separator: str) -> expat.XMLParserType:
    """A UTF-8, namespace-aware expat parser that refuses what restricted XML forbids.

    Args:
        namespace_separator: what expat puts between a namespace URI and a local name.

    Returns:
        The parser, with text buffering on, reparse deferral off (the caller defers large
        tokens itself, see `gateway.xmpp.deferral`) and no content handlers yet.
    """
    # intern=None: pyexpat's default intern dict grows with every distinct name for
    # the parser's lifetime, which a peer could use to grow memory without bound.
    parser = expat.ParserCreate("UTF-8", namespace_separator, None)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.UseForeignDTD(False)
    if hasattr(parser, "SetReparseDeferralEnabled"):
        # Expat >= 2.6 (Python 3.11.9+, 3.12.3+); see gateway.xmpp.deferral.
        parser.SetReparseDeferralEnabled(False)
    parser.buffer_text = True
    parser.buffer_size = _TEXT_BUFFER_SIZE
    parser.XmlDeclHandler = _check_xml_decl
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_entity_decl
    parser.UnparsedEntityDeclHandler = _refuse_unparsed_entity_decl
    parser.NotationDeclHandler = _refuse_notation_decl
    parser.ExternalEntityRefHandler = _refuse_external_entity_ref
    parser.SkippedEntityHandler = _refuse_skipped_entity
    parser.ProcessingInstructionHandler = _refuse_processing_instruction
    parser.CommentHandler = _refuse_comment
    return parser


def _check_xml_decl(version: str, encoding: str | None, standalone: int) -> None:
    """Refuse an XML declaration naming another encoding than UTF-8 (RFC 6120 11.6)."""
    if encoding is not None and encoding.upper() != "UTF-8":
        raise RemoteProtocolError(
            StreamErrorCondition.UNSUPPORTED_ENCODING, f"encoding {encoding!r}"
        )


def _refuse_doctype(
    name: str, system_id: str | None, public_id: str | None, has_subset: bool
) -> None:
    """Refuse a DOCTYPE; expat calls this before any declaration in an internal subset."""
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "document type declaration")


# The next four can only fire inside a DTD, which _refuse_doctype has already refused;
# they stay as defence in depth (defusedxml's forbid_entities / forbid_external).


def _refuse_entity_decl(  # pragma: no cover - see above
    name: str,
    is_parameter: bool,
    value: str | None,
    base: str | None,
    system_id: str | None,
    public_id: str | None,
    notation: str | None,
) -> None:
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "entity declaration")


def _refuse_unparsed_entity_decl(  # pragma: no cover - see above
    name: str, base: str | None, system_id: str, public_id: str | None, notation: str
) -> None:
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "entity declaration")


def _refuse_notation_decl(  # pragma: no cover - see above
    name: str, base: str | None, system_id: str, public_id: str | None
) -> None:
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "notation declaration")


def _refuse_external_entity_ref(  # pragma: no cover - see above
    context: str, base: str | None, system_id: str | None, public_id: str | None
) -> int:
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "external entity")


def _refuse_skipped_entity(name: str, is_parameter: bool) -> None:  # pragma: no cover
    # Expat skips references only when it has not read a DTD it was told about.
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "entity reference")


def _refuse_processing_instruction(target: str, data: str) -> None:
    """Refuse a processing instruction (the XML declaration is not one)."""
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "processing instruction")


def _refuse_comment(data: str) -> None:
    """Refuse a comment."""
    raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "comment")
