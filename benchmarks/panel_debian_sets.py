"""Two panel sets built from Debian packages' images (see panel_datasets.py, which builds them with the others):

- `photos`: photographs from GCompris, Debian's `gcompris-qt-data` (built with 3.1-2; its images are packed
  in Qt resource files, /usr/share/gcompris-qt/rcc/*.rcc, read here directly). 10 classes, each the images of
  one of the package's own folders or file-name groups (PHOTO_CLASSES), at most 40 a class, near-duplicate
  photos (the same monument in two activities) kept once. 75/25 per class, at least 3 validation images.
  The photos' licences (public domain, CC-BY, CC-BY-SA) are listed per file in the package's copyright file.
- `many_classes`: 120 CJK characters (one class each, CHARACTERS), each rendered by 15 font faces from 13
  Debian font packages (FONTS): 8 renderings a class to train on and 2 to validate, the font faces drawn per
  class. Glyph renderings, not photographs: each image is a different typeface designer's drawing of the
  character (Ming/Song, Kai, Gothic/Hei, rounded, handwritten and brush styles).
- `thousand_classes` (not in the panel's default list): 1,000 such characters, 2 renderings a class to train on
  and 1 to validate, for what the linear probe's phase costs at 1,000 classes.
- `paintings` (held out: not in the panel's default list, and no default was chosen on it): the pieces of
  GCompris' painting puzzles (its `paintings` activity's image folder, 23 paintings from Dürer to Kandinsky, 6 to
  25 pieces each, 84 to 339 pixels a side), one class a painting: which painting is a piece from? 75/25 per
  class, at least 2 validation pieces.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")
GCOMPRIS_APT = "apt-get update && apt-get install -y --no-install-recommends gcompris-qt-data"
A = "/gcompris/src/activities/"
# Class: regular expressions over the resources' paths; each class its package's folder or file-name group.
PHOTO_CLASSES = {
    "fish": [A + r"categorization/resource/images/fishes/"],
    "mammals": [A + r"erase/resource/(alpaca|calf|camels|cheetah|dolphin|flying_fox|gibbon|giraffe|goat|gorilla|"
                r"horse|kitten|long_nosed_monkey|macaque|meerkats|nubian_ibex|pika|red_panda|rhinoceros|squirrel)\.",
                A + r"explore_farm_animals/resource/animals/(cat|cow|dog|horse|pig|sheep)\.",
                A + r"explore_world_animals/resource/animals/(bison|giraffe|hedgehog|jaguar|kangaroo|koala|lemur|"
                r"moose|narwhal|panda|polar_bear)\."],
    "birds": [A + r"erase/resource/(gosling|heron|kingfisher|northern_harrier|penguin|spoonbills|swans|toucan)\.",
              A + r"explore_farm_animals/resource/animals/(chicken|duck|owl)\.",
              A + r"explore_world_animals/resource/animals/scarlet_macaw\."],
    "monuments": [A + r"categorization/resource/images/monuments/", A + r"explore_monuments/resource/\w+/",
                  A + r"details/resource/image/(Chenonceau|EgeskovSlotSpejling|EilanDonanCastle|GizahPyramids|"
                  r"Louvre_2007_02_24_c|NDP|Nagoya|Neuschwanstein|OperaSidney|TajMahal|TourEiffel|"
                  r"TowerBridgeLondon)_background\."],
    "hand_tools": [A + r"categorization/resource/images/tools/(?!measuringTape|multimeter)"],
    "measuring_tools": [A + r"categorization/resource/images/tools/(measuringTape|multimeter)"],
    "household_objects": [A + r"categorization/resource/images/others/"],
    "renewable_energy": [A + r"categorization/resource/images/renewable/"],  # dams, solar panels, wind mills
    "sun_and_planets": [A + r"solar_system/resource/[a-z]+\."],
    "music_performance": [A + r"explore_world_music/resource/music/"],
}
PAINTINGS = A + "paintings/resource/image/"
PHOTO_MAX_PER_CLASS = 40
PHOTO_MAX_SIDE = 256

FONT_APT = ("apt-get update && apt-get install -y --no-install-recommends fonts-arphic-ukai fonts-arphic-uming "
            "fonts-arphic-gkai00mp fonts-wqy-microhei fonts-droid-fallback fonts-ipaexfont-gothic "
            "fonts-ipaexfont-mincho fonts-vlgothic fonts-sawarabi-mincho fonts-motoya-l-cedar "
            "fonts-motoya-l-maruberi fonts-seto fonts-kouzan-mouhitsu")
_T = "/usr/share/fonts/truetype/"
FONTS = {  # name: (file, face index in a collection)
    "ukai": (_T + "arphic/ukai.ttc", 0), "uming": (_T + "arphic/uming.ttc", 0),
    "gkai": (_T + "arphic-gkai00mp/gkai00mp.ttf", 0), "wqy_microhei": (_T + "wqy/wqy-microhei.ttc", 0),
    "droid": (_T + "droid/DroidSansFallbackFull.ttf", 0),
    "ipaex_gothic": ("/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf", 0),
    "ipaex_mincho": ("/usr/share/fonts/opentype/ipaexfont-mincho/ipaexm.ttf", 0),
    "vl_gothic": (_T + "vlgothic/VL-Gothic-Regular.ttf", 0),
    "sawarabi_mincho": (_T + "sawarabi-mincho/sawarabi-mincho-medium.ttf", 0),
    "l_cedar": (_T + "motoya-l-cedar/MTLc3m.ttf", 0), "l_maruberi": (_T + "motoya-l-maruberi/MTLmr3m.ttf", 0),
    "seto": (_T + "seto/setofont.ttf", 0), "kouzan": (_T + "kouzan-mouhitsu/kouzan-mouhitsu.ttf", 0),
    "kouzan_gyosho": (_T + "kouzan-mouhitsu/kouzan-mouhitsu-gyosho.ttf", 0),
    "kouzan_sousyo": (_T + "kouzan-mouhitsu/KouzanBrushFontSousyo.ttf", 0),
}
# Common characters written alike in simplified and traditional Chinese and in Japanese; the first
# N_CHARACTERS that every font in FONTS has are the classes.
CANDIDATES = ("一二三四五六七八九十人大小山川日月火水木金土天中上下左右口目耳手足心王子女男田力本白千百"
              "石竹米牛羊犬雨雪花草虫古今正生出入立休先名字文方自父母兄弟夫主工光元西北南不可同合各向"
              "君吉告周和品在地士夕外多夜太失央奇女好安完宗定室客害家容宿寄富寒少尚尺局居屋岩岸州左"
              "巨市布希平年幸幼床底店府度庭式引弱形役彼待律徒得必忍志忘忠快念怒思急性恐恩息才打投抱"
              "拾持指支改放故救敗早明星春昨昼")
N_CHARACTERS, GLYPH_SIDE, GLYPH_TRAIN, GLYPH_VAL = 120, 128, 8, 2


def _rcc_entries(path: Path) -> dict[str, bytes]:
    """The files of a Qt resource (.rcc) file, {path: contents}: format versions 1-3, zlib-compressed or not."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path} is not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node_size = 22 if version >= 2 else 14
    out: dict[str, bytes] = {}

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", b[names + offset:names + offset + 2])
        return b[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> None:
        p = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", b[p:p + 6])
        full = f"{prefix}/{name(name_offset)}" if index else ""
        if flags & 2:  # a directory
            count, first = struct.unpack(">II", b[p + 6:p + 14])
            for child in range(first, first + count):
                walk(child, full)
            return
        (offset,) = struct.unpack(">I", b[p + 10:p + 14])
        (size,) = struct.unpack(">I", b[data + offset:data + offset + 4])
        raw = b[data + offset + 4:data + offset + 4 + size]
        if flags & 4:
            raise ValueError(f"{path}: {full} is zstd-compressed, which this reader does not decode")
        out[full] = zlib.decompress(raw[4:]) if flags & 1 else raw

    walk(0, "")
    return out


def _decode(data: bytes) -> Image.Image:
    """RGB, transparency on white: the job's own decoding."""
    from efficientnet_train.decoding import decode_image

    return decode_image(data)


def _dhash(image: Image.Image) -> int:
    """A 256-bit difference hash: copies of one photo differ in 0-3 bits, different photos in 30 or more."""
    small = np.asarray(image.convert("L").resize((17, 16), Image.BILINEAR), dtype=np.int16)
    return int("".join("1" if bit else "0" for bit in (small[:, 1:] > small[:, :-1]).ravel()), 2)


def photos(out: Path) -> None:
    if not GCOMPRIS_RCC.is_dir():
        sys.exit(f"The 'photos' set needs GCompris' images, and {GCOMPRIS_RCC} is missing. Install them with "
                 f"`{GCOMPRIS_APT}` (Debian or Ubuntu, as root).")
    resources: dict[str, bytes] = {}
    for rcc in sorted(GCOMPRIS_RCC.glob("*.rcc")):
        resources.update((k, v) for k, v in _rcc_entries(rcc).items() if k.endswith(".webp"))
    rng = np.random.default_rng(0)
    seen: list[int] = []  # hashes of the photos kept, in every class: a photo used twice is kept once
    for name, patterns in PHOTO_CLASSES.items():
        kept = []
        for pattern in patterns:
            for path in sorted(k for k in resources if re.match(pattern, k)):
                image = _decode(resources[path])
                h = _dhash(image)
                if any(bin(h ^ other).count("1") <= 16 for other in seen):
                    continue
                seen.append(h)
                kept.append((path, image))
        if len(kept) < 6:
            sys.exit(f"class {name} has only {len(kept)} images in {GCOMPRIS_RCC}: not the gcompris-qt-data "
                     f"this was built with (3.1-2)")
        kept = [kept[i] for i in sorted(rng.permutation(len(kept))[:PHOTO_MAX_PER_CLASS])]
        n_val = max(3, round(0.25 * len(kept)))
        for rank, position in enumerate(rng.permutation(len(kept))):
            path, image = kept[position]
            scale = PHOTO_MAX_SIDE / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            target = out / ("val" if rank < n_val else "train") / name
            target.mkdir(parents=True, exist_ok=True)
            parts = path[len(A):].split("/")  # activity and file name: unique, and says where it came from
            image.save(target / f"{parts[0]}_{Path(parts[-1]).stem}.png")


def paintings(out: Path) -> None:
    if not GCOMPRIS_RCC.is_dir():
        sys.exit(f"The 'paintings' set needs GCompris' images, and {GCOMPRIS_RCC} is missing. Install them with "
                 f"`{GCOMPRIS_APT}` (Debian or Ubuntu, as root).")
    pieces: dict[str, list[tuple[str, bytes]]] = {}
    for rcc in sorted(GCOMPRIS_RCC.glob("*.rcc")):
        for path, data in _rcc_entries(rcc).items():
            # A piece is <painting>_<row letter><column> or <painting>[_-]<number>.
            match = re.fullmatch(re.escape(PAINTINGS) + r"(.+?)(?:_[a-z]\d|[_-]\d+)\.webp", path)
            if match:
                pieces.setdefault(match.group(1).lower().replace("-", "_"), []).append((path, data))
    if len(pieces) < 20:
        sys.exit(f"{GCOMPRIS_RCC} holds {len(pieces)} painting puzzles: not the gcompris-qt-data this was built "
                 f"with (3.1-2)")
    rng = np.random.default_rng(0)
    for name, found in sorted(pieces.items()):
        found.sort()
        n_val = max(2, round(0.25 * len(found)))
        for rank, position in enumerate(rng.permutation(len(found))):
            path, data = found[position]
            target = out / ("val" if rank < n_val else "train") / name
            target.mkdir(parents=True, exist_ok=True)
            _decode(data).save(target / f"{Path(path).stem}.png")


def _covers(path: str, index: int, characters: str) -> set[str]:
    from fontTools.ttLib import TTFont
    font = TTFont(path, fontNumber=index, lazy=True)
    cmap = font.getBestCmap()
    return {c for c in characters if ord(c) in cmap}


def _glyph(font: ImageFont.FreeTypeFont, character: str) -> Image.Image:
    """The character black on white, its ink scaled to fill 80% of a GLYPH_SIDE square, centred."""
    big = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(big).text((200, 200), character, font=font, fill=0, anchor="mm")
    box = ImageOps.invert(big).getbbox()
    if box is None:
        raise ValueError(f"{font.getname()} draws nothing for {character!r}")
    ink = big.crop(box)
    scale = 0.8 * GLYPH_SIDE / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.LANCZOS)
    square = Image.new("L", (GLYPH_SIDE, GLYPH_SIDE), 255)
    square.paste(ink, ((GLYPH_SIDE - ink.width) // 2, (GLYPH_SIDE - ink.height) // 2))
    return square


def many_classes(out: Path) -> None:
    _glyph_set(out, "many_classes", "".join(dict.fromkeys(CANDIDATES)), N_CHARACTERS, GLYPH_TRAIN, GLYPH_VAL)


def thousand_classes(out: Path) -> None:
    """1,000 classes of 2 training images and 1 validation image: what a buyer's 1,000-class set costs the
    linear probe's phase (the characters drawn at random, fixed seed, from those every face has)."""
    every = "".join(chr(c) for c in range(0x4E00, 0x9FA6))
    order = np.random.default_rng(1).permutation(len(every))
    _glyph_set(out, "thousand_classes", "".join(every[i] for i in order), 1000, 2, 1)


def _glyph_set(out: Path, name: str, candidates: str, n_characters: int, n_train: int, n_val: int) -> None:
    """One class a character: the first `n_characters` of `candidates` that every face in FONTS has, each drawn
    by `n_train` + `n_val` faces chosen per class."""
    missing = [f for f, _ in FONTS.values() if not Path(f).is_file()]
    if missing:
        sys.exit(f"The {name!r} set needs {len(FONTS)} CJK font faces, and {', '.join(missing)} "
                 f"{'is' if len(missing) == 1 else 'are'} missing. Install them with `{FONT_APT}` (as root).")
    covered = set(candidates)
    for path, index in FONTS.values():
        covered &= _covers(path, index, candidates)
    characters = [c for c in candidates if c in covered][:n_characters]
    if len(characters) < n_characters:
        sys.exit(f"only {len(characters)} of the candidate characters are in every font")
    fonts = {name: ImageFont.truetype(path, 300, index=index) for name, (path, index) in FONTS.items()}
    names = sorted(fonts)
    rng = np.random.default_rng(0)
    for character in characters:
        label = f"u{ord(character):04x}"  # class folders in ASCII: the code point
        order = rng.permutation(len(names))[:n_val + n_train]
        for rank, position in enumerate(order):
            target = out / ("val" if rank < n_val else "train") / label
            target.mkdir(parents=True, exist_ok=True)
            _glyph(fonts[names[position]], character).save(target / f"{names[position]}.png")
