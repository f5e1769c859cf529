"""DICOM sources (issue 17, first part): the pixels a viewer shows, refusals, no patient data stored.

The DICOM files are made here with pydicom from a demo chest X-ray, with the structures hospitals send:
MONOCHROME1 and 2, 12- and 16-bit (signed) pixels with rescale and windowing, RLE compression, and
patient attributes whose values must never reach a shard."""

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from pneumo_dist import images, shards
from pneumo_dist.demo import DemoSpec, write_demo_dataset
from pneumo_dist.predict import PneumoniaDetector

DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PHI-4711-XYZ",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC99887766",
}


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
    with_pixels: bool = True,
) -> bytes:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = DIGITAL_XRAY_FOR_PRESENTATION
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = DIGITAL_XRAY_FOR_PRESENTATION
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = modality
    for name, value in PHI.items():
        setattr(dataset, name, value)
    if with_pixels:
        bits = bits_stored or pixels.dtype.itemsize * 8
        dataset.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    if rescale:
        dataset.RescaleSlope, dataset.RescaleIntercept = rescale
    if window:
        dataset.WindowCenter, dataset.WindowWidth = window
    if syntax != ExplicitVRLittleEndian:
        dataset.compress(syntax)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> tuple[bytes, np.ndarray]:
    """A demo chest X-ray as a JPEG and its 8-bit gray pixels (0 and 255 both present)."""
    root = tmp_path_factory.mktemp("dicom-source")
    spec = DemoSpec(images_per_class=(("x", 1),), min_side_px=90, max_side_px=120, rgb_fraction=0.0)
    (path,) = [p for p in write_demo_dataset(str(root), spec) if "NORMAL" in p]
    gray = np.asarray(Image.open(path).convert("L")).copy()
    gray[0, 0], gray[0, 1] = 0, 255
    out = io.BytesIO()
    Image.fromarray(gray).save(out, format="PNG")
    return out.getvalue(), gray


def cases(gray: np.ndarray) -> dict[str, bytes]:
    """DICOM files that a viewer shows as exactly `gray`."""
    wide = gray.astype(np.uint16) * 16  # 12 bits stored
    # Modality LUT: 0.5 v - 100 = 8 g - 100; the window [-100, 1940] maps that linearly back onto 0..255
    # (DICOM PS3.3 C.11.2.1.2: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, c = 920.5, w = 2041).
    windowed = {"bits_stored": 12, "rescale": (0.5, -100.0), "window": (920.5, 2041.0)}
    return {
        "8-bit MONOCHROME2": make_dicom(gray),
        "8-bit MONOCHROME1 (inverted)": make_dicom(255 - gray, photometric="MONOCHROME1"),
        "12-bit, rescale and window": make_dicom(wide, **windowed),
        "12-bit RLE Lossless": make_dicom(wide, syntax=RLELossless, **windowed),
        "16-bit signed, no window (own min..max)": make_dicom(gray.astype(np.int16) * 100 - 12000),
        # The window maps 4080 - 16 g onto 255 - g, which MONOCHROME1 shows inverted: g.
        "12-bit MONOCHROME1, window": make_dicom(
            (4080 - wide).astype(np.uint16),
            photometric="MONOCHROME1",
            bits_stored=12,
            window=(2040.5, 4081.0),
        ),
    }


def test_dicom_pixels_are_what_a_viewer_shows(xray):
    _, gray = xray
    for name, content in cases(gray).items():
        decoded, size = images.decode_grayscale(content)
        assert size == gray.shape, name
        np.testing.assert_array_equal(np.asarray(decoded), gray, err_msg=name)


def test_a_dicom_of_an_image_is_stored_and_scored_as_the_image(xray, small_export, tmp_path):
    png, gray = xray
    detector = PneumoniaDetector.load(small_export)
    (tmp_path / "xray.png").write_bytes(png)
    expected = detector.predict(tmp_path / "xray.png").probability
    for name, content in cases(gray).items():
        (tmp_path / "scan.dcm").write_bytes(content)
        (tmp_path / "no-extension").write_bytes(content)  # known by its DICM preamble
        for image in (tmp_path / "scan.dcm", tmp_path / "no-extension", content):
            assert detector.predict(image).probability == pytest.approx(expected, abs=1e-6), name


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("no pixel data", "DICOM file without pixel data"),
        ("multi-frame", r"multi-frame DICOM \(2 frames\)"),
        ("CT", "DICOM modality CT is not a radiograph"),
        ("truncated", "DICOM"),
    ],
)
def test_dicom_files_that_are_not_one_radiograph_are_bad_images_with_a_reason(xray, kind, reason):
    _, gray = xray
    content = {
        "no pixel data": lambda: make_dicom(gray, with_pixels=False),
        "multi-frame": lambda: make_dicom(np.stack([gray, gray])),
        "CT": lambda: make_dicom(gray, modality="CT"),
        "truncated": lambda: make_dicom(gray)[:-500],
    }[kind]()
    with pytest.raises(images.BadImage, match=reason):
        images.decode_grayscale(content)


def test_make_shards_reads_dicom_folders_and_no_patient_value_reaches_any_file(xray, tmp_path):
    png, gray = xray
    source = tmp_path / "source"
    files = {
        "train/NORMAL/IM-0001-0001.dcm": make_dicom(gray),
        "train/NORMAL/IM-0002-0001.dcm": make_dicom(255 - gray, photometric="MONOCHROME1"),
        "train/PNEUMONIA/person1_bacteria_1.dcm": cases(gray)["12-bit RLE Lossless"],
        "train/PNEUMONIA/person2_virus_2.dcm": make_dicom(gray, with_pixels=False),  # skipped, reason kept
        "test/NORMAL/IM-0003-0001.dcm": make_dicom(gray),
        "test/PNEUMONIA/person3_bacteria_3.dcm": make_dicom(gray),
    }
    for name, content in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    destination = tmp_path / "shards"
    options = shards.ShardOptions(stored_size_px=48, min_shards=1, val_fraction=0.0, keep_val=False)
    shards.make_shards(str(source), str(destination), options, workers=1)
    written = b"".join(p.read_bytes() for p in destination.rglob("*") if p.is_file())
    assert written, "no shard written"
    for value in PHI.values():
        assert value.encode() not in written, value
    # The stored image of each readable DICOM is the stored image of the PNG it was made from.
    stored_png, _ = images.to_stored_image(png, 48)
    for name in ("train/NORMAL/IM-0001-0001.dcm", "train/PNEUMONIA/person1_bacteria_1.dcm"):
        assert images.to_stored_image(files[name], 48)[0] == stored_png
    assert b"DICOM file without pixel data" in written  # the skipped file's reason, in the manifest
