"""A stock pynetdicom peer for the fidelity sweep, run as its own process: ``python fidelity_peer.py JOB OUT``.

Its own process so that nothing of dcbnode is imported into it: ``dcbnode.net.wire`` replaces parts of
pynetdicom process-wide when imported, and a pytest run imports it (test_wire.py, test_retrieve.py).

JOB (JSON): ``{"host", "port", "aet", "store": [{"key", "path"}], "gets": [{"syntax", "out", "items":
[{"key", "sop_class", "uid"}]}]}``.  Each file to store is a Part-10 file sent as its own bytes
(``_config.STORE_SEND_CHUNKED_DATASET``) in a presentation context of its own transfer syntax; each get is
one association proposing exactly one transfer syntax for every SOP class, and one C-GET per instance,
the data set received written as it arrived (``event.encoded_dataset(include_meta=False)``) to
``out/<key>.dcm`` raw.  OUT (JSON): per store key ``{"status", "comment"}`` or ``{"refused": why}``; per get
and key ``{"status", "failed", "received": path | null, "syntax", "comment"}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

MAX_CONTEXTS = 120  # PS3.8 allows 128 presentation contexts per association; one is the GET model's
CONTEXT_RESULTS = {0x01: "user rejection", 0x02: "no reason (provider rejection)",
                   0x03: "abstract syntax not supported", 0x04: "transfer syntaxes not supported"}


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.maximum_pdu_size = 0  # no limit on what the node may send
    return ae


def store(job: dict[str, Any]) -> dict[str, Any]:
    """Send every file over as few associations as the context limit allows."""
    results: dict[str, Any] = {}
    files = []
    for entry in job["store"]:
        meta = read_file_meta_info(entry["path"])
        files.append((entry, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    pairs = sorted({(sop_class, syntax) for _, sop_class, syntax in files})
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's own bytes, never re-encoded
    try:
        for batch in _chunks(pairs, MAX_CONTEXTS):
            ae = _ae("FIDELITY")
            for sop_class, syntax in batch:
                ae.add_requested_context(sop_class, syntax)
            assoc = ae.associate(job["host"], job["port"], ae_title=job["aet"])
            if not assoc.is_established:
                for entry, sop_class, syntax in files:
                    if (sop_class, syntax) in batch:
                        results[entry["key"]] = {"refused": "association not established"}
                continue
            rejected = {(cx.abstract_syntax, cx.transfer_syntax[0]): CONTEXT_RESULTS.get(cx.result, str(cx.result))
                        for cx in assoc.rejected_contexts}
            try:
                for entry, sop_class, syntax in files:
                    if (sop_class, syntax) not in batch:
                        continue
                    if (sop_class, syntax) in rejected:
                        results[entry["key"]] = {"refused": f"presentation context rejected: "
                                                            f"{rejected[(sop_class, syntax)]}"}
                        continue
                    status = assoc.send_c_store(Path(entry["path"]))
                    results[entry["key"]] = _status(status)
            finally:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return results


def _status(status: Dataset) -> dict[str, Any]:
    if "Status" not in status:
        return {"status": None, "comment": "no response (association aborted or timed out)"}
    return {"status": int(status.Status), "comment": str(status.get("ErrorComment", ""))}


def get(job: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """One association proposing ``request["syntax"]`` only; one C-GET per instance."""
    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    arrived: dict[str, tuple[str, str]] = {}
    items = request["items"]

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        key = current["key"]
        path = out / f"{key}.raw"
        path.write_bytes(event.encoded_dataset(include_meta=False))
        arrived[key] = (str(path), str(event.context.transfer_syntax))
        return 0x0000 if uid == current["uid"] else 0xA900

    current: dict[str, str] = {}
    classes = sorted({item["sop_class"] for item in items})
    for batch in _chunks(classes, MAX_CONTEXTS):
        ae = _ae("FIDELGET")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in batch:
            ae.add_requested_context(sop_class, request["syntax"])
        roles = [build_role(sop_class, scp_role=True) for sop_class in batch]
        assoc = ae.associate(job["host"], job["port"], ae_title=job["aet"], ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts} if assoc.is_established else set()
        rejected = {cx.abstract_syntax: CONTEXT_RESULTS.get(cx.result, str(cx.result))
                    for cx in assoc.rejected_contexts} if assoc.is_established else {}
        try:
            for item in items:
                if item["sop_class"] not in batch:
                    continue
                if item["sop_class"] not in accepted:
                    why = rejected.get(item["sop_class"], "association not established")
                    results[item["key"]] = {"refused": f"presentation context rejected: {why}"}
                    continue
                current.update(item)
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "IMAGE"
                identifier.SOPInstanceUID = item["uid"]
                final: Dataset | None = None
                for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                    final = status
                result = _status(final if final is not None else Dataset())
                result["failed"] = int(final.get("NumberOfFailedSuboperations", 0)) if final is not None else None
                received = arrived.pop(item["key"], None)
                result["received"], result["syntax"] = received if received else (None, None)
                results[item["key"]] = result
        finally:
            if assoc.is_established:
                assoc.release()
    return results


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    output: dict[str, Any] = {"store": store(job) if job.get("store") else {}, "gets": []}
    for request in job.get("gets", []):
        output["gets"].append({"syntax": request["syntax"], "results": get(job, request)})
    Path(out_path).write_text(json.dumps(output))


if __name__ == "__main__":
    main(*sys.argv[1:3])
