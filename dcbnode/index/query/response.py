"""Building the C-FIND response identifiers from rows of the index (and stored headers for optional keys)."""

from __future__ import annotations

from collections.abc import Callable

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import IS, PersonName

from .charset import response_charset
from .keys import Query, level_of
from .sql import derived_needed

_NO_VALIDATION = pydicom_config.IGNORE

HeaderReader = Callable[[str], Dataset | None]
#: how a response attribute gets its value (see :class:`ResponsePlan`)
_CONST, _COLUMN, _DERIVED, _HEADER, _EMPTY = range(5)


class ResponsePlan:
    """Everything about building a response that does not depend on the row, worked out once per query."""

    def __init__(self, query: Query, names: list[str], retrieve_ae_title: str, headers: bool) -> None:
        position = {name: i for i, name in enumerate(names)}
        needed = derived_needed(query)
        self.slots: list[tuple[BaseTag, str, bool, int, object]] = []
        for tag, keyword, vr in query.returned:
            if keyword == "QueryRetrieveLevel":
                slot: tuple[int, object] = (_CONST, query.level)
            elif keyword == "RetrieveAETitle":
                slot = (_CONST, retrieve_ae_title)
            elif keyword == "InstanceAvailability":
                slot = (_CONST, "ONLINE")
            elif keyword and keyword in position:
                slot = (_COLUMN, position[keyword])
            elif any(keyword in kws for kws in needed.values()):
                owner = level_of(keyword)
                slot = (_DERIVED, (position[f"_{owner}_pk"], owner, keyword))
            elif headers and tag in query.header_keys:
                slot = (_HEADER, None)
            else:
                slot = (_EMPTY, None)
            # plain elements go straight into the dataset's dict (what Dataset.__setitem__ ends up doing);
            # private, sequence and header elements take the checked path
            plain = not BaseTag(tag).is_private and vr != "SQ" and slot[0] != _HEADER
            self.slots.append((BaseTag(tag), vr, plain, *slot))
        self.level = query.level
        self.add_level = "QueryRetrieveLevel" not in {kw for _, kw, _ in query.returned}
        self.charset = position.get("_charset")


#: VRs whose one-value text pydicom keeps as the str itself (dates and times too, unless it converts them)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "SH", "LT", "ST", "UT", "UC", "UR"})
_DATETIME_VRS = frozenset({"DA", "TM", "DT"})


def _element(tag: BaseTag, vr: str, value: object) -> DataElement:
    """A response element; values come from the index, so pydicom's value validation is skipped.

    Single text values get the type pydicom would convert them to (str, UID, PersonName) up front,
    which skips its generic conversion (the bulk of building a response otherwise).
    """
    if type(value) is str and "\\" not in value:
        if vr in _TEXT_VRS or (vr in _DATETIME_VRS and not pydicom_config.datetime_conversion):
            return DataElement(tag, vr, value, validation_mode=_NO_VALIDATION, already_converted=True)
        if vr == "UI":
            return DataElement(tag, vr, UID(value, _NO_VALIDATION), validation_mode=_NO_VALIDATION,
                               already_converted=True)
        if vr == "PN":
            return DataElement(tag, vr, PersonName(value, validation_mode=_NO_VALIDATION),
                               validation_mode=_NO_VALIDATION, already_converted=True)
    elif type(value) is int and vr == "IS":
        return DataElement(tag, vr, IS(value, _NO_VALIDATION), validation_mode=_NO_VALIDATION,
                           already_converted=True)
    elif type(value) is list and vr in _TEXT_VRS and len(value) > 1 and all(type(v) is str for v in value):
        return DataElement(tag, vr, MultiValue(str, value), validation_mode=_NO_VALIDATION, already_converted=True)
    return DataElement(tag, vr, value, validation_mode=_NO_VALIDATION)


def build_response(plan: ResponsePlan, row: tuple, derived: dict[str, dict[int, dict]],
                   header: Dataset | None) -> Dataset:
    """The response dataset of one matching row."""
    ds = Dataset()
    elements = ds._dict
    texts: list[str] = []
    for tag, vr, plain, how, source in plan.slots:
        if how == _COLUMN:
            value = row[source]  # type: ignore[index]
            if value is None:
                value = ""
            elif not isinstance(value, (str, int)):
                value = str(value)
        elif how == _CONST:
            value = source
        elif how == _DERIVED:
            index, owner, keyword = source  # type: ignore[misc]
            value = derived[owner][row[index]][keyword]
        elif how == _HEADER and header is not None and tag in header:
            element = header[tag]
            vr, value = element.VR, element.value
            value = str(value) if vr == "PN" and value is not None else value
        else:
            value = None
        if plain:
            elements[tag] = _element(tag, vr, value)
        else:
            ds[tag] = _element(tag, vr, value)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts.extend(v for v in value if isinstance(v, str))
    if plan.add_level:
        ds.QueryRetrieveLevel = plan.level
    charset = response_charset(texts, str(row[plan.charset] or "") if plan.charset is not None else "")
    if charset:
        ds.SpecificCharacterSet = charset
    return ds
