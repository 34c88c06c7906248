"""chest_mnist.images: the same picture exported as 8-bit PNG, 16-bit PNG and TIFF, and DICOM
(rescaled, MONOCHROME1, windowed) gives the same pixels, and through predict the same
probabilities; what cannot be used is refused with the reason; the note reaches the output."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import ExifTags, Image
from pydicom import uid
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from chest_mnist.images import read_image
from tests.conftest import PNEUMONIA_NPZ, compose_train


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A real 28px X-ray, stretched to span 0..255 (so 16-bit copies scaled over their full
    range give back exactly these values)."""
    image = np.load(PNEUMONIA_NPZ)["test_images"][0].astype(np.float64)
    stretched = np.rint((image - image.min()) * 255 / (image.max() - image.min()))
    assert stretched.min() == 0 and stretched.max() == 255
    return stretched.astype(np.uint8)


def write_dicom(
    path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", **elements
) -> Path:
    """A DX DICOM file of 16-bit pixels `stored` (int16 when signed), with more elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = elements.pop("syntax", uid.ExplicitVRLittleEndian)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    for key, value in elements.items():
        setattr(ds, key, value)
    if "PixelData" not in ds and stored.size:
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def exports(picture: np.ndarray, folder: Path) -> dict[str, Path]:
    """The picture as a hospital might export it, each file with what a reader must undo."""
    folder.mkdir(exist_ok=True)
    v = picture.astype(np.int64)
    files = {name: folder / name for name in ("8bit.png", "16bit.png", "16bit.tif")}
    Image.fromarray(picture).save(files["8bit.png"])
    Image.fromarray((v * 257).astype(np.uint16)).save(files["16bit.png"])
    Image.fromarray((v * 257).astype(np.uint16)).save(files["16bit.tif"])
    # scanner units = 2 * stored - 1024; no window: the full range of those units
    files["rescaled.dcm"] = write_dicom(
        folder / "rescaled.dcm",
        (3 * v + 100).astype(np.uint16),
        RescaleSlope=2,
        RescaleIntercept=-1024,
    )
    # bone dark, and signed pixels
    files["monochrome1.dcm"] = write_dicom(
        folder / "monochrome1.dcm", (100 * (255 - v) - 12000).astype(np.int16), "MONOCHROME1"
    )
    # a window in scanner units (2 * stored - 1024) that maps 1000 + 4 v exactly to v (DICOM's
    # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255); two pixels far outside it, where the
    # picture is 0 and 255, must be clipped to those
    stored = 1012 + 2 * v
    stored[np.unravel_index(picture.argmin(), picture.shape)] = 0  # where the picture is 0
    stored[np.unravel_index(picture.argmax(), picture.shape)] = 60000  # and 255
    files["window.dcm"] = write_dicom(
        folder / "window.dcm",
        stored.astype(np.uint16),
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[1510.5, 40],
        WindowWidth=[1021, 400],
    )
    return files


def test_every_export_gives_the_8_bit_pixels(picture, tmp_path):
    files = exports(picture, tmp_path / "xrays")
    notes = {}
    for name, path in files.items():
        pixels, notes[name] = read_image(path, size=28, channels=1)
        np.testing.assert_array_equal(pixels, picture, err_msg=name)
        pixels, _ = read_image(path, size=64, channels=3)  # resized after the conversion
        np.testing.assert_array_equal(
            pixels, read_image(files["8bit.png"], size=64, channels=3)[0], err_msg=name
        )
    assert notes == {
        "8bit.png": "",
        "16bit.png": "16-bit gray scaled to 8 bits over its full range 0..65535",
        "16bit.tif": "16-bit gray scaled to 8 bits over its full range 0..65535",
        "rescaled.dcm": "DICOM MONOCHROME2; rescale slope 2 intercept -1024; "
        "no window: scaled to 8 bits over its full range -824..706",
        "monochrome1.dcm": "DICOM MONOCHROME1 inverted; "
        "no window: scaled to 8 bits over its full range -12000..13500",
        "window.dcm": "DICOM MONOCHROME2; rescale slope 2 intercept -1024; "
        "window 1510.5/1021 (the first of 2)",
    }


@pytest.mark.parametrize("name", ["IM0001", "1.2.840.113619.2.55.3.604688119.969.1"])
def test_a_dicom_is_known_by_its_preamble_whatever_its_name(picture, tmp_path, name):
    """Hospital exports name files IM0001, or by their UID (whose last number is a suffix)."""
    path = write_dicom(tmp_path / name, picture.astype(np.uint16) * 257)
    pixels, note = read_image(path, size=28, channels=1)
    np.testing.assert_array_equal(pixels, picture)
    assert note.startswith("DICOM MONOCHROME2")
    # predict's folder scan finds it too, and no other file without an image suffix
    from chest_mnist.predict import collect

    (tmp_path / "README").write_text("not an image")
    (tmp_path / "notes.1").write_text("not an image either, of the same suffix\n" * 10)
    (items,) = collect([str(tmp_path)], 28, 1, "pneumoniamnist", "test")
    assert items.path == str(path) and items.error is None


def test_a_folder_scan_leaves_out_a_discs_index_and_hidden_files(picture, tmp_path):
    """A DICOM disc's DICOMDIR indexes image files of its own; macOS zips add `._` files of
    metadata with the image's suffix; `.ipynb_checkpoints/` holds copies. None is an image
    the user means: the scan leaves them out, and read on its own a DICOMDIR says what it is."""
    from chest_mnist.predict import collect

    disc = tmp_path / "disc"
    (disc / "IMAGES").mkdir(parents=True)
    image = write_dicom(disc / "IMAGES" / "IM000001", picture.astype(np.uint16))
    index = write_dicom(disc / "DICOMDIR", np.zeros((0, 0), np.uint16))
    index_copy = write_dicom(tmp_path / "index.dcm", np.zeros((0, 0), np.uint16))
    for path in (index, index_copy):  # what makes a DICOMDIR one, as written here
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.MediaStorageDirectoryStorage
        ds.save_as(path, enforce_file_format=True)
    (disc / "__MACOSX").mkdir()
    (disc / "__MACOSX" / "._IM000001.png").write_bytes(b"\0\5\26\7" + b"\0" * 200)
    (disc / ".ipynb_checkpoints").mkdir()
    Image.fromarray(picture).save(disc / ".ipynb_checkpoints" / "xray.png")

    assert [(item.path, item.error) for item in collect([str(disc)], 28, 1, "x", "test")] == [
        (str(image), None)
    ]
    with pytest.raises(ValueError, match="a DICOMDIR, a disc's index of its images, not an image"):
        read_image(index_copy, 28, 1)


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian"), [(True, True), (False, True), (False, False)]
)
def test_a_dicom_without_file_meta_is_read_in_the_encoding_it_has(
    picture, tmp_path, implicit_vr, little_endian
):
    """An older export: no preamble, no file meta (so no transfer syntax), in any of the three
    uncompressed encodings (big-endian pixels read as little-endian would be noise)."""
    path = write_dicom(tmp_path / "modern.dcm", picture.astype(np.uint16) * 257)
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    if not little_endian:  # the stored bytes are the pixels' in the dataset's byte order
        ds.PixelData = (picture.astype(">u2") * 257).tobytes()
    old = tmp_path / "old.dcm"
    pydicom.dcmwrite(old, ds, implicit_vr=implicit_vr, little_endian=little_endian)
    assert old.read_bytes()[128:132] != b"DICM"
    assert "TransferSyntaxUID" not in pydicom.dcmread(old, force=True).file_meta
    pixels, note = read_image(old, 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == "DICOM MONOCHROME2; no window: scaled to 8 bits over its full range 0..65535"


def test_windows_clip_and_the_other_voi_functions(tmp_path):
    """DICOM PS3.3 C.11.2.1.2-3 at a chest CT's soft-tissue window, 40/400."""
    values = np.tile(np.array([-1000, -160, -159, 40, 239, 240, 1000], np.int16), (7, 1))
    linear, _ = read_image(
        write_dicom(tmp_path / "l.dcm", values, WindowCenter=40, WindowWidth=400),
        size=7,
        channels=1,
    )
    # LINEAR: 0 at or below c - 0.5 - (w - 1) / 2 = -160, 255 above c - 0.5 + (w - 1) / 2 = 239
    expected = np.rint((np.array([-160, -160, -159, 40, 239, 239, 239]) + 160) / 399 * 255)
    np.testing.assert_array_equal(linear[0], expected)
    exact, note = read_image(
        write_dicom(
            tmp_path / "e.dcm",
            values,
            WindowCenter=40,
            WindowWidth=400,
            VOILUTFunction="LINEAR_EXACT",
        ),
        size=7,
        channels=1,
    )
    np.testing.assert_array_equal(exact[0], np.rint(np.clip((values[0] + 160) / 400, 0, 1) * 255))
    assert note == "DICOM MONOCHROME2; window 40/400 LINEAR_EXACT"
    sigmoid, _ = read_image(
        write_dicom(
            tmp_path / "s.dcm", values, WindowCenter=40, WindowWidth=400, VOILUTFunction="SIGMOID"
        ),
        size=7,
        channels=1,
    )
    np.testing.assert_array_equal(sigmoid[0], [0, 30, 31, 128, 224, 225, 255])
    for width in (0, -400):  # NaN at the centre; an inverted image
        bad = write_dicom(
            tmp_path / f"s{width}.dcm",
            values,
            WindowCenter=40,
            WindowWidth=width,
            VOILUTFunction="SIGMOID",
        )
        with pytest.raises(
            ValueError, match=rf"Window Width {width}\.0 must be above 0 for SIGMOID"
        ):
            read_image(bad, size=7, channels=1)


def test_what_a_dicom_cannot_give_is_refused_with_the_reason(picture, tmp_path):
    two = np.stack([picture, picture]).astype(np.uint16)
    with pytest.raises(ValueError, match="DICOM with 2 frames: predict reads single images"):
        read_image(write_dicom(tmp_path / "cine.dcm", two, NumberOfFrames=2), 28, 1)
    with pytest.raises(ValueError, match="DICOM file without pixel data"):
        read_image(write_dicom(tmp_path / "sr.dcm", np.zeros((0, 0), np.uint16)), 28, 1)
    (tmp_path / "notes.dcm").write_text("not a DICOM file at all\n" * 20)
    with pytest.raises(ValueError, match="not a DICOM file pydicom can read"):
        read_image(tmp_path / "notes.dcm", 28, 1)

    if get_decoder(uid.JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here: nothing to refuse")
    compressed = write_dicom(
        tmp_path / "jpeg.dcm",
        picture.astype(np.uint16),
        syntax=uid.JPEGLosslessSV1,
        PixelData=encapsulate([b"\xff\xd8\xff\xd9"]),
    )
    with pytest.raises(ValueError, match="compressed as JPEG Lossless.*pip install pylibjpeg"):
        read_image(compressed, 28, 1)


def test_a_damaged_compressed_dicom_is_one_line_without_pydicoms_traceback(
    picture, tmp_path, caplog
):
    if not get_decoder(uid.JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG Baseline decoder here: the file is refused before decoding")
    damaged = write_dicom(
        tmp_path / "jpeg.dcm",
        picture.astype(np.uint16),
        syntax=uid.JPEGBaseline8Bit,
        PixelData=encapsulate([b"\xff\xd8 not a JPEG \xff\xd9"]),
    )
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(ValueError, match="cannot decode its DICOM pixel data"),
    ):
        read_image(damaged, 28, 1)
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.levelno >= 40]


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_an_image_of_several_frames_is_refused_as_a_dicom_of_several_is(picture, tmp_path, suffix):
    """An animated GIF or a multi-page TIFF: which frame is the X-ray is not predict's guess."""
    frames = [Image.fromarray(picture), Image.fromarray(255 - picture)]
    path = tmp_path / f"two{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="an image of 2 frames: predict reads single images"):
        read_image(path, 28, 1)
    frames[0].save(tmp_path / f"one{suffix}")
    np.testing.assert_array_equal(read_image(tmp_path / f"one{suffix}", 28, 1)[0], picture)


def test_alpha_is_dropped_only_when_nothing_is_transparent(picture, tmp_path):
    opaque = np.dstack([picture, picture, picture, np.full_like(picture, 255)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    pixels, note = read_image(tmp_path / "opaque.png", 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == "alpha channel dropped (fully opaque)"
    Image.fromarray(opaque[..., [0, 3]], "LA").save(tmp_path / "opaque_gray.png")
    assert read_image(tmp_path / "opaque_gray.png", 28, 1)[1] == note

    opaque[5, 7, 3] = 254  # one pixel barely see-through
    Image.fromarray(opaque, "RGBA").save(tmp_path / "transparent.png")
    with pytest.raises(
        ValueError, match=r"format RGBA \(4 channels\) with transparent pixels .*in 1 of 784"
    ):
        read_image(tmp_path / "transparent.png", 28, 1)


def test_an_exif_orientation_is_applied_and_said(picture, tmp_path):
    """A camera stores its picture sideways and says, in EXIF, how to turn it for display."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # turn 90 degrees clockwise to display
    Image.fromarray(np.rot90(picture).copy()).save(tmp_path / "sideways.png", exif=exif)
    pixels, note = read_image(tmp_path / "sideways.png", 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == "turned upright (EXIF orientation 6)"
    exif[ExifTags.Base.Orientation] = 1  # upright: nothing to do, nothing said
    Image.fromarray(picture).save(tmp_path / "upright.png", exif=exif)
    assert read_image(tmp_path / "upright.png", 28, 1)[1] == ""
    wide = (np.rot90(picture).astype(np.uint16) * 257).copy()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(wide).save(tmp_path / "sideways16.tif", exif=exif)
    pixels, note = read_image(tmp_path / "sideways16.tif", 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == (
        "turned upright (EXIF orientation 6); "
        "16-bit gray scaled to 8 bits over its full range 0..65535"
    )


def test_what_the_tiff_tags_say_of_wide_pixels_is_heeded(picture, tmp_path):
    """MinIsWhite (photometric interpretation 0) inverted as MONOCHROME1 is; signed 16 bits
    named so; 16-bit colour, which Pillow cuts to its high bytes, refused."""
    v = picture.astype(np.int64)
    tifffile.imwrite(tmp_path / "white0.tif", ((255 - v) * 257).astype(np.uint16), photometric=0)
    pixels, note = read_image(tmp_path / "white0.tif", 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == (
        "16-bit gray scaled to 8 bits over its full range 0..65535; TIFF MinIsWhite inverted"
    )
    tifffile.imwrite(tmp_path / "signed.tif", (100 * v - 12000).astype(np.int16))
    pixels, note = read_image(tmp_path / "signed.tif", 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == "16-bit signed gray scaled to 8 bits over its full range -12000..13500"
    twelve_bits = np.dstack([v * 16] * 3).astype(np.uint16)  # 0..4080: one byte cuts it to 0..15
    tifffile.imwrite(tmp_path / "rgb16.tif", twelve_bits, photometric="rgb")
    with pytest.raises(ValueError, match=r"16 bits a channel in RGB \(RGB;16.\): Pillow reads"):
        read_image(tmp_path / "rgb16.tif", 28, 3)


def test_float_and_blank_wide_images(picture, tmp_path):
    Image.fromarray(picture.astype(np.float32) / 3).save(tmp_path / "float.tif")
    pixels, note = read_image(tmp_path / "float.tif", 28, 1)
    np.testing.assert_array_equal(pixels, picture)
    assert note == "32-bit float gray scaled to 8 bits over its full range 0..85"
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(tmp_path / "blank.png")
    pixels, note = read_image(tmp_path / "blank.png", 28, 1)
    assert (pixels == 0).all()
    assert note == "16-bit gray scaled to 8 bits (every pixel is 40000: made black)"


@pytest.mark.slow
def test_predict_gives_every_export_the_same_probabilities_and_says_what_it_converted(
    trained_run, picture, tmp_path
):
    from chest_mnist.predict import predict

    files = exports(picture, tmp_path / "xrays")
    opaque = np.dstack([picture] * 3 + [np.full_like(picture, 255)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "xrays" / "opaque.png")
    opaque[0, 0, 3] = 0
    Image.fromarray(opaque, "RGBA").save(tmp_path / "xrays" / "transparent.png")

    def run(fmt: str) -> Path:
        out = tmp_path / f"predictions.{fmt}"
        cfg = compose_train(
            [
                f"ckpt_path={trained_run}",
                f"inputs=[{tmp_path / 'xrays'}]",
                f"output={out}",
                f"format={fmt}",
                f"paths.output_dir={tmp_path}/predict_run",
            ],
            "predict",
        )
        assert predict(cfg)["failed"] == 1
        return out

    with open(run("csv")) as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    assert set(rows) == set(files) | {"opaque.png", "transparent.png"}
    probabilities = [k for k in rows["8bit.png"] if k.startswith("p_")]
    reference = [float(rows["8bit.png"][k]) for k in probabilities]
    for name in [*files, "opaque.png"]:  # the same pixels; only their place in the batch differs
        assert rows[name]["error"] == ""
        ours = [float(rows[name][k]) for k in probabilities]
        np.testing.assert_allclose(ours, reference, atol=1e-6, err_msg=name)
    assert rows["8bit.png"]["converted"] == ""
    assert rows["16bit.png"]["converted"] == (
        "16-bit gray scaled to 8 bits over its full range 0..65535"
    )
    assert rows["monochrome1.dcm"]["converted"].startswith("DICOM MONOCHROME1 inverted")
    assert rows["opaque.png"]["converted"] == "alpha channel dropped (fully opaque)"
    assert "transparent pixels" in rows["transparent.png"]["error"]
    assert rows["transparent.png"]["p_" + probabilities[0][2:]] == ""

    document = json.loads(run("json").read_text())
    converted = {Path(p["path"]).name: p["converted"] for p in document["predictions"]}
    assert converted == {name: row["converted"] for name, row in rows.items()}
