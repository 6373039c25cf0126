"""load_image: paths, PIL, numpy (8/16-bit, float, RGBA), DICOM, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from encoders import load_image


def test_png_and_jpeg_paths(tmp_path):
    Image.new("RGB", (20, 10), (10, 200, 30)).save(tmp_path / "a.png")
    Image.new("L", (20, 10), 77).save(tmp_path / "b.jpg")
    a, b = load_image(tmp_path / "a.png"), load_image(str(tmp_path / "b.jpg"))
    assert a.mode == "RGB" and a.size == (20, 10) and a.getpixel((0, 0)) == (10, 200, 30)
    assert b.mode == "L" and abs(b.getpixel((3, 3)) - 77) <= 2


def test_16bit_png_is_stretched_to_8bit(tmp_path):
    arr = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit-ish data
    Image.fromarray(arr).save(tmp_path / "x16.png")
    img = load_image(tmp_path / "x16.png")
    assert img.mode == "L"
    values = np.asarray(img)
    assert values.min() == 0 and values.max() == 255


@pytest.mark.parametrize("arr, mode", [
    (np.full((8, 9), 200, dtype=np.uint8), "L"),
    (np.arange(72, dtype=np.uint16).reshape(8, 9) * 900, "L"),
    (np.full((8, 9, 3), 0.5, dtype=np.float32), "RGB"),
    (np.random.default_rng(0).normal(size=(8, 9)) * 1000, "L"),  # e.g. Hounsfield units
    (np.zeros((3, 8, 9), dtype=np.uint8), "RGB"),  # channel-first
    (np.zeros((8, 9, 1), dtype=np.uint8), "L"),
])
def test_numpy_arrays(arr, mode):
    img = load_image(arr)
    assert img.mode == mode and img.size == (9, 8)


def test_float_image_in_unit_range_keeps_its_scale():
    assert np.asarray(load_image(np.full((4, 4), 0.5))).max() == 128


def test_rgba_is_composited_over_black():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[..., 3] = 128  # half transparent
    img = load_image(arr)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (128, 0, 0)
    assert load_image(Image.fromarray(arr)).getpixel((0, 0)) == (128, 0, 0)


def test_pil_modes_are_normalised():
    assert load_image(Image.new("1", (4, 4), 1)).mode == "L"
    assert load_image(Image.new("P", (4, 4))).mode == "RGB"
    assert load_image(Image.new("CMYK", (4, 4))).mode == "RGB"
    assert load_image(Image.new("I;16", (4, 4))).mode == "L"


def test_corrupt_and_non_image_files_name_the_file(tmp_path):
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    for path in (bad, text):
        with pytest.raises(ValueError, match=path.name):
            load_image(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((2, 2, 2, 2)))


def test_truncated_png_names_the_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(path)


# -- DICOM -------------------------------------------------------------------------------

def _dicom(name: str):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return pydicom, path


def test_dicom_ct_rescaled_and_windowed():
    _, path = _dicom("CT_small.dcm")
    img = load_image(path)
    assert img.mode == "L" and img.size == (128, 128)
    values = np.asarray(img)
    assert values.min() == 0 and values.max() == 255  # no window in the file: min..max of HU


def test_dicom_window_and_monochrome1(tmp_path):
    pydicom, path = _dicom("MR_small.dcm")  # has WindowCenter 600 / WindowWidth 1600
    normal = np.asarray(load_image(path)).astype(int)
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(float)
    expected = np.round(np.clip((raw - (600 - 800)) / 1600, 0, 1) * 255)
    assert np.abs(normal - expected).max() <= 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "mono1.dcm"
    ds.save_as(inverted_path)
    assert np.array_equal(np.asarray(load_image(inverted_path)).astype(int), 255 - normal)


def test_a_deflated_dicom_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """The demo's uploads: a deflated dataset of zeros inflates a thousandfold before any size is known."""
    pydicom, path = _dicom("CT_small.dcm")
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    inflated = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: inflated.append(a))
    with pytest.raises(ValueError, match="deflated.dcm: a deflated DICOM .* is not read"):
        load_image(tmp_path / "deflated.dcm")
    assert inflated == []  # refused from its file meta alone


def test_the_middle_frame_of_a_multi_frame_image_is_held_to_the_pixel_limit(tmp_path, monkeypatch):
    small, large = Image.new("L", (4, 4), 10), Image.new("L", (64, 64), 200)
    small.save(tmp_path / "frames.tif", save_all=True, append_images=[large, small])
    assert load_image(tmp_path / "frames.tif").size == (64, 64)  # the middle frame
    monkeypatch.setenv("MEDVQA_MAX_IMAGE_PIXELS", "100")  # the first frame (16 px) passes, the middle does not
    with pytest.raises(ValueError, match="frames.tif: image is 64x64"):
        load_image(tmp_path / "frames.tif")


def test_a_multi_frame_dicom_reads_its_middle_frame_held_to_the_limit_alone(tmp_path, monkeypatch):
    """A CT series in one file: the middle slice is the image, and the pixel limit is a slice's (pydicom 3 decodes
    that frame alone), so a 200-slice series of 512x512 loads where the limit is 50 Mpx."""
    pydicom, path = _dicom("MR_small.dcm")
    ds = pydicom.dcmread(path)
    frame = ds.pixel_array  # (64, 64) uint16
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join((f.astype(frame.dtype)).tobytes() for f in (frame // 4, frame, frame // 2))
    ds.save_as(tmp_path / "series.dcm")
    single = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(tmp_path / "series.dcm")), single)  # the middle frame, as itself
    if int(pydicom.__version__.split(".")[0]) >= 3:  # pydicom 2 decodes every frame: all are held to the limit
        monkeypatch.setenv("MEDVQA_MAX_IMAGE_PIXELS", str(64 * 64 * 2))  # one slice fits, the three do not
        assert np.array_equal(np.asarray(load_image(tmp_path / "series.dcm")), single)


def test_dicom_magic_without_suffix_and_corrupt_dicom(tmp_path):
    _, path = _dicom("CT_small.dcm")
    plain = tmp_path / "ct_no_suffix"
    plain.write_bytes(open(path, "rb").read())
    assert load_image(plain).size == (128, 128)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="broken.dcm"):
        load_image(broken)


def test_a_photo_with_an_embedded_preview_reads_its_first_frame(tmp_path):
    photo, preview = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (16, 12), (0, 0, 250))
    photo.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview, preview])
    with Image.open(tmp_path / "camera.jpg") as opened:
        assert opened.format == "MPO" and opened.n_frames == 3  # as phones and cameras write them
    loaded = load_image(tmp_path / "camera.jpg")  # a stack's middle slice only for TIFF (and DICOM)
    assert loaded.size == (64, 48) and loaded.getpixel((5, 5))[0] > 150


def _rotated_photo(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 ("turn 90 degrees clockwise to view")."""
    arr = np.zeros((40, 64, 3), dtype=np.uint8)
    arr[:, :16] = 255  # a bright band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


def test_an_exif_rotated_photo_reads_upright_from_a_path_bytes_and_an_opened_image(tmp_path):
    from encoders.images import decode_image

    path = _rotated_photo(tmp_path)
    from_path = load_image(path)
    assert from_path.size == (40, 64)  # stored 64 wide, 40 high: upright it is 40 wide
    upright = np.asarray(from_path.convert("L"), dtype=np.float64)
    assert upright[:16].mean() > 200 and upright[-16:].mean() < 50  # clockwise: the stored left edge is now on top
    with Image.open(path) as opened:
        from_pil = load_image(opened)
    np.testing.assert_array_equal(np.asarray(from_pil), np.asarray(from_path))
    np.testing.assert_array_equal(np.asarray(decode_image(path.read_bytes(), path.name)), np.asarray(from_path))


def test_the_feature_cache_knows_an_opened_photo_by_its_upright_pixels(tmp_path):
    from encoders.cache import image_hash

    path = _rotated_photo(tmp_path)
    with Image.open(path) as opened:
        tagged, stored = image_hash(opened), image_hash(Image.fromarray(np.asarray(opened)))
    assert tagged == image_hash(load_image(path))  # the pixels the encoder is given
    assert tagged != stored  # the same stored pixels without the tag are another image
