"""Explain a bit-exact mismatch: the first site where ORT and the PyTorch reference differ.

The exporter records, for every site, the ONNX tensors of its input and output as they are
stored (uint8 code + 128, for example: each with its offset) and the node that calls its
scheme (metadata `hnq.site_tensors`). `locate_mismatch` runs the model in ORT with those
tensors as extra outputs, subtracts the offsets, runs the integer reference with site
recorders, and walks the sites in model order. `write_reproducer` cuts the smallest model
around the first differing site and saves it with its input and both outputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

REPRODUCER_SCRIPT = '''"""Run the site model on the saved input and compare with the PyTorch reference's output."""
import numpy as np
import onnxruntime as ort

data = np.load("tensors.npz")
session = ort.InferenceSession("site.onnx", providers=["CPUExecutionProvider"])
got = session.run(None, {{session.get_inputs()[0].name: data["input"]}})[0].astype(np.int64) - {output_offset}
expected = data["reference_output"]
differs = got != expected
print("site: {site} (scheme {scheme}, node {node})")
print(f"codes compared: {{expected.size}}, mismatched: {{int(differs.sum())}}")
if differs.any():
    index = tuple(int(i) for i in np.argwhere(differs)[0])
    print(f"first difference at {{index}}: ORT {{got[index]}}, reference {{expected[index]}}")
    print(f"largest difference: {{int(np.abs(got - expected).max())}}")
'''


@dataclass
class MismatchReport:
    site: str
    scheme: str
    node: str
    where: str  # "input" (the difference arises before this site) or "output"
    codes: int
    mismatched: int
    max_difference: int
    first_index: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        origin = ("before this site (its input already differs)" if self.where == "input"
                  else "in this site (its input agrees, its output differs)")
        return (f"first mismatch at site {self.site!r} (scheme {self.scheme!r}, ONNX node {self.node!r}), "
                f"{origin}: {self.mismatched} of {self.codes} codes differ, largest difference "
                f"{self.max_difference}")


def _site_tensors(model: onnx.ModelProto) -> dict[str, dict]:
    props = {p.key: p.value for p in model.metadata_props}
    entries = json.loads(props.get("hnq.site_tensors", "{}"))
    if not entries or not all(isinstance(e.get("input"), dict) for e in entries.values()):
        raise ValueError("the model records no site tensors in the current form (exported by an older "
                         "hnq-export): re-export it")
    return entries


def _with_site_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


def _reference_site_codes(qmodel, pixels: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    records: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def recorder(site, x, y) -> None:
        records[site.site_name] = (x.value.numpy().astype(np.int64), y.value.numpy().astype(np.int64))

    sites = qmodel.sites()
    for site in sites.values():
        site.recorder = recorder
    try:
        qmodel.logits_codes(pixels)
    finally:
        for site in sites.values():
            site.recorder = None
    return records


def locate_mismatch(onnx_path: str | Path, qmodel, pixels: np.ndarray) -> tuple[MismatchReport | None, dict]:
    """Find the first site in model order whose input or output codes differ, with the tensors involved."""
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    site_tensors = _site_tensors(model)
    order = [name for name in qmodel.sites() if name in site_tensors]
    names = [site_tensors[s][k]["name"] for s in order for k in ("input", "output")]
    probe = _with_site_outputs(model, names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    values = dict(zip(output_names, session.run(None, {session.get_inputs()[0].name: pixels})))
    reference = _reference_site_codes(qmodel, torch.from_numpy(pixels))
    for site in order:
        entry = site_tensors[site]
        for where, index in (("input", 0), ("output", 1)):
            got = values[entry[where]["name"]].astype(np.int64) - entry[where]["offset"]
            expected = reference[site][index]
            differs = got != expected
            if differs.any():
                report = MismatchReport(
                    site=site, scheme=entry["scheme"], node=entry["node"], where=where, codes=int(expected.size),
                    mismatched=int(differs.sum()), max_difference=int(np.abs(got - expected).max()),
                    first_index=[int(i) for i in np.argwhere(differs)[0]],
                )
                tensors = {"input": values[entry["input"]["name"]], "ort_output": values[entry["output"]["name"]],
                           "reference_input": reference[site][0], "reference_output": reference[site][1]}
                return report, tensors
    return None, {}


def write_reproducer(onnx_path: str | Path, report: MismatchReport, tensors: dict, folder: str | Path) -> Path:
    """Save site.onnx (the site's input to its output), tensors.npz and reproduce.py in `folder`."""
    from onnx.utils import Extractor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(onnx_path))
    entry = _site_tensors(model)[report.site]
    inferred = onnx.shape_inference.infer_shapes(model)
    sub = Extractor(inferred).extract_model([entry["input"]["name"]], [entry["output"]["name"]])
    onnx.save(sub, str(folder / "site.onnx"))
    np.savez(folder / "tensors.npz", input=tensors["input"], ort_output=tensors["ort_output"],
             reference_input=tensors["reference_input"], reference_output=tensors["reference_output"])
    (folder / "reproduce.py").write_text(REPRODUCER_SCRIPT.format(site=report.site, scheme=report.scheme,
                                                                   node=report.node,
                                                                   output_offset=entry["output"]["offset"]))
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return folder
