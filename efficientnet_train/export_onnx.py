"""`export-onnx`: a trained model as one ONNX file, to run outside PyTorch (onnxruntime, TensorRT, OpenVINO, ...).

The file holds everything between the evaluation transform's output and calibrated probabilities:

    images          uint8 [batch, 3, S, S]: RGB, channels first, the image resized and centre-cropped as
                    validation does (S is the model's evaluation size; the metadata says how)
    probabilities   float32 [batch, classes]: the normalisation, the network, the mirror average when the model
                    was validated with it, and the temperature, as `serve` and `predict` compute them

The batch dimension is free; the image size is fixed at the evaluation size, as timm advises for the `tf_`
models (their "SAME" padding depends on the size). The labels and the preprocessing are in the file's metadata.
The export is checked before it is written: onnxruntime must give the probabilities PyTorch gives.

    export-onnx model.tar.gz                # or model/ (its model_best.pth.tar and labels.json) -> model.onnx
    export-onnx model/ --output classifier.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import __version__
from .errors import JobError
from .data import ModelInput
from .inference import model_files, read_labels
from .model import load_trained_model, predict_label_logits, predict_log_probabilities
from .outputs import BEST_MODEL_FILE, atomic_write, check_output_file

OPSET = 18
TOLERANCE = 1e-4  # largest difference in any probability between onnxruntime and PyTorch


class CalibratedClassifier(torch.nn.Module):
    """uint8 images (the evaluation transform's output) to calibrated probabilities: validation's input
    (ModelInput) and prediction (predict_log_probabilities; for several labels an image predict_label_logits and
    each label's sigmoid), traced into the graph."""

    def __init__(self, model: torch.nn.Module, data_config: dict, mirror: bool, temperature: float,
                 multi_label: bool = False):
        super().__init__()
        self.model, self.mirror, self.temperature, self.multi_label = model.eval(), mirror, temperature, multi_label
        self.to_input = ModelInput(data_config, torch.device("cpu"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return predict_label_logits(self.model, self.to_input(images), self.mirror, self.temperature).sigmoid()
        return predict_log_probabilities(self.model, self.to_input(images), self.mirror, self.temperature).exp()


def export(source: Path, output: Path) -> dict:
    """Write `output` from a model folder or model.tar.gz; returns what was exported and how long it took."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="export-onnx-") as scratch:
        model_dir = model_files(source, Path(scratch))
        model, checkpoint = load_trained_model(model_dir / BEST_MODEL_FILE)
        labels = read_labels(model_dir, expected=len(checkpoint["labels"]))
    config = checkpoint["data_config"]
    wrapper = CalibratedClassifier(model.float(), config,
                                   bool(checkpoint.get("eval_hflip", False)),
                                   float(checkpoint.get("temperature", 1.0)),
                                   bool(checkpoint.get("multi_label", False))).eval()
    size = tuple(config["input_size"])
    example = torch.randint(0, 256, (2, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metadata = {"labels": json.dumps(labels, ensure_ascii=False), "input": f"uint8 [batch, {size[0]}, {size[1]}, "
                f"{size[2]}] RGB", "preprocessing": json.dumps({key: config[key] for key in (
                    "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std") if key in config}),
                "architecture": checkpoint["arch"], "temperature": repr(wrapper.temperature),
                "mirror_average": str(wrapper.mirror).lower(), "epoch": str(checkpoint.get("epoch")),
                # several labels an image: sigmoid probabilities, each label's threshold for saying yes
                **({"multi_label": "true", "thresholds": json.dumps(checkpoint["thresholds"])}
                   if wrapper.multi_label else {})}
    proto = _exported(wrapper, example)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    difference = _check(data, wrapper)
    atomic_write(output, lambda f: f.write(data))
    return {"output": str(output), "bytes": len(data), "seconds": round(time.monotonic() - started, 1),
            "max_difference": difference, "input_size": list(size), "labels": len(labels)}


def _exported(wrapper: torch.nn.Module, example: torch.Tensor):
    """The ONNX model (an onnx.ModelProto) from torch's exporter, weights inside, the batch dimension free."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(wrapper, (example,), input_names=["images"], output_names=["probabilities"],
                                    dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                    external_data=False, verbose=False)
    return program.model_proto


def _check(data: bytes, wrapper: torch.nn.Module) -> float:
    """The largest difference between onnxruntime's probabilities and PyTorch's, for batches of 1 and 3; raise if
    it is over TOLERANCE or any top-1 differs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator, worst = torch.Generator().manual_seed(1), 0.0
    for batch in (1, 3):
        size = session.get_inputs()[0].shape[1:]
        images = torch.randint(0, 256, (batch, *size), dtype=torch.uint8, generator=generator)
        exported = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        with torch.no_grad():
            expected = wrapper(images)
        worst = max(worst, float((exported - expected).abs().max()))
        if worst > TOLERANCE or not torch.equal(exported.argmax(1), expected.argmax(1)):
            raise JobError(f"The exported model answers differently from the PyTorch model (largest difference "
                           f"{worst:.2e} in a probability): not written. Please report it with the model's args.yml.")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export-onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model folder (model_best.pth.tar, labels.json) or model.tar.gz")
    parser.add_argument("--output", type=Path, default=Path("model.onnx"),
                        help="the ONNX file (default: model.onnx in the current folder)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    options = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401 - the check needs it; say so before the export's time is spent
    except ImportError:
        print("export-onnx needs onnx, onnxscript and onnxruntime: pip install 'efficientnet-train[export]'",
              file=sys.stderr)
        return 2
    try:
        check_output_file(options.output, "--output", "model.onnx")  # before the export's time is spent
        result = export(options.model, options.output)
    except JobError as exc:
        print(f"export-onnx: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {result['output']} ({result['bytes'] / 1e6:.1f} MB, {result['labels']} classes, input uint8 "
          f"[batch, {', '.join(map(str, result['input_size']))}]) in {result['seconds']} s; onnxruntime matches "
          f"PyTorch within {result['max_difference']:.1e}.")
    return 0


if __name__ == "__main__":  # python -m: as the installed command, offline and with its stop handling
    from efficientnet_train.commands import export_onnx

    sys.exit(export_onnx())
