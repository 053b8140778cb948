import io

import numpy as np
import pytest
from PIL import Image

from annotate.config import DecodeConfig
from annotate.engine.decode import Rejected, decode_image, decode_record, to_rgb
from annotate.engine.records import Record
from annotate.sources import FolderSource
from tests.support.annotate_inputs import bad_inputs, png_bytes, scene

LIMITS = DecodeConfig(min_side=16, working_side=64)


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_every_bad_input_gets_its_reason_and_every_odd_one_decodes(name):
    data, code = bad_inputs()[name]
    if code is None:
        decoded = decode_image(data, LIMITS)
        assert decoded.working.mode == "RGB" and max(decoded.working.size) <= 64
    else:
        with pytest.raises(Rejected) as caught:
            decode_image(data, LIMITS)
        assert caught.value.stage == "decode" and caught.value.reason.startswith(f"{code}: ")


def test_exif_orientation_is_applied():
    data, _ = bad_inputs()["exif-rotated.jpg"]
    decoded = decode_image(data, LIMITS)
    assert (decoded.width, decoded.height) == (48, 96)
    pixels = np.asarray(decoded.working)
    # The blue band stored at the left is on top once rotated 90 degrees clockwise.
    assert pixels[2, 24, 2] > 150 and pixels[-2, 24, 0] > 150


def test_sixteen_bit_grey_is_scaled_not_clipped():
    data, _ = bad_inputs()["grey16.png"]
    pixels = np.asarray(decode_image(data, LIMITS).working)
    assert pixels[0, 0, 0] < 5 and pixels[-1, -1, 0] > 250 and 100 < pixels[32, 0, 0] < 156


def test_cmyk_becomes_rgb_with_its_colours():
    data, _ = bad_inputs()["cmyk.jpg"]
    original = np.asarray(scene(7), dtype=np.float32)
    decoded = np.asarray(decode_image(data, LIMITS).working, dtype=np.float32)
    assert np.abs(decoded - original).mean() < 12


def test_transparency_goes_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_pixel_limit_is_ours_and_checked_before_decoding():
    with pytest.raises(Rejected, match=r"too_many_pixels: 64x64 = 4096 pixels > 1000"):
        decode_image(png_bytes(scene(1)), DecodeConfig(max_pixels=1000))


def test_working_copy_is_bounded_and_size_is_the_original():
    decoded = decode_image(png_bytes(scene(1, (300, 150))), LIMITS)
    assert (decoded.width, decoded.height) == (300, 150)
    assert decoded.working.size == (64, 32)


def test_records_that_cannot_be_read_are_rejected_with_the_reason(tmp_path):
    (tmp_path / "big.png").write_bytes(png_bytes(scene(2)))
    (tmp_path / "ok.png").write_bytes(png_bytes(scene(2)))
    source = FolderSource(tmp_path)
    missing = Record(uri=str(tmp_path / "gone.png"), source="folder", partition=0, position=0)
    decode_record(missing, source, LIMITS, embed=False)
    assert missing.reject_stage == "read" and missing.reject_reason.startswith("unreadable: ")
    big = Record(uri=str(tmp_path / "big.png"), source="folder", partition=0, position=1)
    decode_record(big, source, DecodeConfig(max_bytes=100), embed=False)
    assert big.reject_reason == "too_many_bytes: more than 100 bytes" and big.sha256 is None
    ok = Record(uri=str(tmp_path / "ok.png"), source="folder", partition=0, position=2)
    decode_record(ok, source, LIMITS, embed=True)
    assert not ok.rejected and ok.image == (tmp_path / "ok.png").read_bytes()
    assert ok.rgb().size == (64, 64) and len(ok.sha256) == 64
    assert Image.open(io.BytesIO(ok.image)).size == (64, 64)
