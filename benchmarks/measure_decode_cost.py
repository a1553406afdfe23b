"""What the hardest images a client can send cost the endpoint's decoder: for each, its size, what
`decode_image` (with the endpoint's limits) answered, the peak memory it added and the time it took,
each in a fresh process. The table goes to docs/security.md.

    python benchmarks/measure_decode_cost.py [--work DIR] [--only NAME,...]

The cases: the ones an attack would pick (a progressive JPEG repeating one scan, progressive JPEGs whose
full-size coefficient buffer dwarfs what they decode to, transparent and 16-bit images at the pixel cap)
and, beside each limit, the largest image it still accepts, which is the worst a client can cause.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Peak resident memory from the kernel's high-water mark, reset first (ru_maxrss would carry the peak of the
# process this one was forked from).
MEASURE = textwrap.dedent("""
    import sys, time
    from efficientnet_train.decoding import ENDPOINT, UnreadableImage, decode_image
    def kilobytes(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
    data = open(sys.argv[1], "rb").read()
    before = kilobytes("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    start = time.perf_counter()
    try:
        decode_image(data, 320, ENDPOINT)  # the endpoint's decode side for a model at 300 px is about 345
        outcome = "decoded"
    except UnreadableImage as exc:
        outcome = "refused: " + str(exc)
    seconds = time.perf_counter() - start
    print(f"{(kilobytes('VmHWM:') - before) // 1024} {seconds:.2f} {outcome}")
""")


def scan_bomb(side: int, repeats: int) -> bytes:
    """A grey progressive JPEG whose last scan is repeated `repeats` times: each repeat walks every block."""
    encoded = io.BytesIO()
    Image.new("L", (side, side), 128).save(encoded, "JPEG", progressive=True)
    data = encoded.getvalue()
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def saved(image: Image.Image, image_format: str, **options) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, image_format, **options)
    return encoded.getvalue()


def _noise(mode: str, side: int) -> Image.Image:
    """Smooth content with a gradient alpha: compresses well, and every pixel is partly transparent."""
    base = Image.linear_gradient("L").resize((side, side))
    if mode == "RGBA":
        return Image.merge("RGBA", (base, base.transpose(Image.Transpose.ROTATE_90), base, base))
    if mode == "LA":
        return Image.merge("LA", (base, base.transpose(Image.Transpose.ROTATE_90)))
    return Image.merge(mode, [base] * len(mode))


CASES = {
    "normal photo (JPEG 640x480)": lambda: saved(Image.linear_gradient("L").resize((640, 480)).convert("RGB"), "JPEG"),
    "scan bomb: progressive 9000x9000 grey, 2,000 scans": lambda: scan_bomb(9000, 2000),
    "scan bomb at the cap: progressive 4096x4096 grey, 114 scans": lambda: scan_bomb(4096, 108),
    "progressive CMYK 9400x9400, 4:4:4": lambda: saved(Image.new("CMYK", (9400, 9400)), "JPEG", progressive=True,
                                                       subsampling=0),
    "progressive RGB 9000x9000, 4:4:4": lambda: saved(Image.new("RGB", (9000, 9000)), "JPEG", progressive=True,
                                                      subsampling=0),
    "progressive RGB 6000x6000, 4:4:4 (largest accepted)": lambda: saved(Image.new("RGB", (6000, 6000)), "JPEG",
                                                                         progressive=True, subsampling=0),
    "progressive CMYK 5100x5100, 4:4:4 (largest accepted)": lambda: saved(Image.new("CMYK", (5100, 5100)), "JPEG",
                                                                          progressive=True, subsampling=0),
    "baseline RGB JPEG 10000x8900 (decoded at 1/8)": lambda: saved(Image.new("RGB", (10000, 8900)), "JPEG"),
    "lossless transparent WebP 4096x4096": lambda: saved(_noise("RGBA", 4096), "WEBP", lossless=True),
    "lossless transparent WebP 3770x3770 (largest accepted)": lambda: saved(_noise("RGBA", 3770), "WEBP",
                                                                            lossless=True),
    "RGBA PNG 4096x4096": lambda: saved(_noise("RGBA", 4096), "PNG"),
    "grey+alpha PNG 4096x4096": lambda: saved(_noise("LA", 4096), "PNG"),
    "RGBA TIFF (deflate) 4096x4096": lambda: saved(_noise("RGBA", 4096), "TIFF", compression="tiff_adobe_deflate"),
    "transparent GIF 4096x4096": lambda: saved(_noise("L", 4096).convert("P"), "GIF", transparency=0),
    "16-bit PNG 4096x4096": lambda: saved(Image.new("I;16", (4096, 4096)), "PNG"),
    "16-bit PNG 9400x9400": lambda: saved(Image.new("I;16", (9400, 9400)), "PNG"),
}


def decode_cost(path: Path) -> tuple[int, float, str]:
    """What decoding the image in `path` as the endpoint does costs a fresh process: MB of peak memory added,
    seconds, and "decoded" or "refused: <reason>"."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    if result.returncode:
        raise RuntimeError(result.stderr.strip()[-300:])
    megabytes, seconds, outcome = result.stdout.strip().split(" ", 2)
    return int(megabytes), float(seconds), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="where the images are written (default: a temp dir)")
    parser.add_argument("--only", help="comma-separated case names (a unique start of each is enough)")
    args = parser.parse_args()
    cases = CASES
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        cases = {name: make for name, make in CASES.items() if any(name.startswith(w) for w in wanted)}
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    print("| image | bytes | answer | peak memory added | seconds |\n|---|---|---|---|---|")
    for index, (name, make) in enumerate(cases.items()):
        path = work / f"case{index}.img"
        path.write_bytes(make())
        try:
            megabytes, seconds, outcome = decode_cost(path)
        except RuntimeError as exc:
            print(f"| {name} | {path.stat().st_size:,} | failed: {exc} | | |")
            continue
        print(f"| {name} | {path.stat().st_size:,} | {outcome} | {megabytes} MB | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
