"""Malformed and hostile DICOM files, made here with a seeded generator, through images.decode_grayscale
(what make_shards, predict.py, --ray and PneumoniaDetector all call). Run as a process of its own, so
that its peak memory is its own:

    python tests/dicom_fuzz.py [SEED]   one JSON line: {"cases", "bad", "escaped": [...], "peak_mib", ...}

"escaped" lists each case whose error was anything but a BadImage (there should be none).
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pneumo_dist import images  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"
INSTANCE = "1.2.826.0.1.3680043.8.498.4711"


def base(rows: int = 64, columns: int = 64) -> Dataset:
    """A valid 12-bit DX radiograph with a window."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = DX
    dataset.file_meta.MediaStorageSOPInstanceUID = INSTANCE  # fixed: the same bytes every run
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID, dataset.SOPInstanceUID = DX, dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    pixels = (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) * 7) % 4096
    dataset.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12)
    dataset.WindowCenter, dataset.WindowWidth = 2048, 4096
    return dataset


def to_bytes(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def jpeg_bytes(side: int, format: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("L", (side, side)).save(out, format=format)
    return out.getvalue()


def encapsulated(dataset: Dataset, syntax: str, frame: bytes) -> Dataset:
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    return dataset


def rle_frame(pixels: int, segments: int) -> bytes:
    """A DICOM RLE frame (PS3.5 G.3) of `segments` segments of `pixels` zero bytes each, in PackBits
    runs of 128: ~150x smaller than what it decodes to."""
    runs, rest = divmod(pixels, 128)
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest else b"")
    offsets = [64 + index * len(segment) for index in range(segments)]
    header = struct.pack("<16I", segments, *offsets, *[0] * (15 - segments))
    return header + segment * segments


def with_attributes(**values) -> bytes:
    dataset = base()
    for name, value in values.items():
        if value is None:
            delattr(dataset, name)
        else:
            setattr(dataset, name, value)
    return to_bytes(dataset)


def lut_item(descriptor, data) -> Dataset:
    item = Dataset()
    if descriptor is not None:
        item.LUTDescriptor = descriptor
    if data is not None:
        item.add_new(0x00283006, "US", data)  # LUTData, its VR given (pydicom infers it from the descriptor)
    return item


def nested(depth: int) -> bytes:
    """A VOILUTSequence whose item holds a sequence, whose item holds one, ... `depth` deep."""
    dataset = base()
    inner = Sequence([lut_item([4096, 0, 12], list(range(4096)))])
    for _ in range(depth):
        holder = Dataset()
        holder.ReferencedImageSequence = inner
        inner = Sequence([holder])
    dataset.VOILUTSequence = inner
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * depth))
    try:
        return to_bytes(dataset)
    finally:
        sys.setrecursionlimit(limit)


def cases(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    valid = to_bytes(base())
    made = {
        "valid": valid,
        # Bombs: a header that lies about its compressed frame; samples x bits beyond the cap.
        "jpeg frame larger than its header": to_bytes(
            encapsulated(base(), JPEGBaseline8Bit, jpeg_bytes(6000))
        ),
        "jpeg 2000 frame larger than its header": to_bytes(
            encapsulated(base(), JPEG2000Lossless, jpeg_bytes(3000, "JPEG2000"))
        ),
        "rle 7000 x 7000 x 3 x 32 bit": to_bytes(
            encapsulated(
                _set(
                    base(),
                    Rows=7000,
                    Columns=7000,
                    SamplesPerPixel=3,
                    BitsAllocated=32,
                    BitsStored=32,
                    PlanarConfiguration=0,
                    PhotometricInterpretation="RGB",
                ),
                RLELossless,
                rle_frame(7000 * 7000, segments=12),
            )
        ),
        "compressed frame without a header": to_bytes(encapsulated(base(), JPEGBaseline8Bit, b"\0" * 100)),
        # Wrong values and VRs.
        "text in RescaleSlope": with_attributes(RescaleSlope="1.0", RescaleIntercept="0").replace(
            b"1.0 ", b"abc "
        ),
        "text in WindowCenter": with_attributes(WindowCenter="2048").replace(b"2048", b"x048"),
        "zero window width": with_attributes(WindowWidth=0),
        "unknown VOI LUT function": with_attributes(VOILUTFunction="WEIRD"),
        "empty VOILUTSequence": with_attributes(VOILUTSequence=Sequence([])),
        "VOI LUT without descriptor": with_attributes(VOILUTSequence=Sequence([lut_item(None, [0, 1])])),
        "200-bit VOI LUT": with_attributes(VOILUTSequence=Sequence([lut_item([4096, 0, 200], [0] * 4096)])),
        "short VOI LUT data": with_attributes(VOILUTSequence=Sequence([lut_item([4096, 0, 12], [0, 1])])),
        "bad ModalityLUTSequence": with_attributes(ModalityLUTSequence=Sequence([lut_item([0, 0, 99], [])])),
        "sequences nested 2,000 deep": nested(2000),
        "no PixelData": with_attributes(PixelData=None),
        "BitsAllocated 0": with_attributes(BitsAllocated=0),
        "BitsAllocated 7": with_attributes(BitsAllocated=7),
        "BitsAllocated 64": with_attributes(BitsAllocated=64),
        "BitsAllocated 200": with_attributes(BitsAllocated=200),
        "4 samples per pixel": with_attributes(SamplesPerPixel=4),
        "unknown photometric interpretation": with_attributes(PhotometricInterpretation="PURPLE"),
        "header larger than its pixels": with_attributes(Rows=128, Columns=128),
        "header smaller than its pixels": with_attributes(Rows=32),
        "negative rows": with_attributes(Rows=65535, Columns=65535),
    }
    for index, cut in enumerate(sorted(rng.integers(132, len(valid), size=12))):
        made[f"truncated at byte {cut} ({index})"] = valid[:cut]
    for index in range(24):
        damaged = bytearray(valid)
        for position in rng.integers(132, min(len(valid), 700), size=4):  # the header's part
            damaged[position] = int(rng.integers(0, 256))
        made[f"header bytes changed ({index})"] = bytes(damaged)
    return made


def _set(dataset: Dataset, **values) -> Dataset:
    for name, value in values.items():
        setattr(dataset, name, value)
    return dataset


def main(seed: int = 0) -> None:
    made = cases(seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad, escaped = 0, []
    for name, data in made.items():
        try:
            images.decode_grayscale(data)
        except images.BadImage:
            bad += 1
        except BaseException as error:  # noqa: BLE001 - what the test is looking for
            escaped.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "cases": len(made),
                "bad": bad,
                "escaped": escaped,
                "peak_mib": peak / 1024,
                "start_mib": before / 1024,
            }
        )
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
