import zipfile

import av
import numpy as np
import pytest
import torch

from common.errors import CorruptVideoError, InputNotFoundError, InputTooLargeError, NotAVideoError, TooFewFramesError
from common.synthetic import false_colour, render_video, with_caption
from common.video import (
    constant_borders,
    evenly_filled,
    inpainted,
    load_video,
    resized_size,
    shot_cuts,
    static_overlay,
    to_float,
    uniform_indices,
    write_image_folder,
    write_video,
)


def _frames(n=6, h=32, w=48):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_evenly_filled_keeps_the_given_indices_and_adds_up_to_the_count():
    scored = uniform_indices(49, 10)
    filled = evenly_filled(49, scored, 16)
    assert set(scored) <= set(filled) and len(filled) == 16  # the union with uniform_indices(49, 16) has 22
    assert len(set(uniform_indices(49, 16)) | set(scored)) == 22
    assert max(b - a for a, b in zip(filled, filled[1:])) <= 5  # no gap left as wide as the scored ones' (5-6)
    assert evenly_filled(10, [], 4) == [0, 3, 6, 9]  # nothing kept: the ends, evenly filled
    assert evenly_filled(8, range(8), 16) == list(range(8))  # never more than there are
    assert evenly_filled(100, [50], 5) == [0, 25, 50, 74, 99]
    assert evenly_filled(30, range(0, 30, 2), 4) == list(range(0, 30, 2)) + [29]  # more kept than the count: all kept


def test_constant_borders_find_letterbox_and_pillarbox_bars_through_a_lossy_codec(tmp_path):
    """Black bars above and below, dark grey bars at the sides, written as H.264 and read back: each
    is found, less the rows the codec's ringing reaches (within its 8 px blocks), plus the 2 px
    margin; the picture is never cut by more than the margin."""
    video = render_video("boxes", "orbit", frames=12, size=(180, 240))
    assert constant_borders(video.frames) == (0, 0, 0, 0)
    framed = video.frames.clone()
    framed[:, :20] = 0
    framed[:, -24:] = 0
    framed[:, :, :30] = 16
    framed[:, :, -16:] = 16
    assert constant_borders(framed) == (22, 26, 32, 18)  # exact bars: the bar plus the 2 px margin
    decoded = load_video(write_video(tmp_path / "framed.mp4", framed)).frames
    top, bottom, left, right = constant_borders(decoded)
    for found, bar in ((top, 20), (bottom, 24), (left, 30), (right, 16)):
        assert bar - 6 <= found <= bar + 2, constant_borders(decoded)


def test_constant_borders_leave_bright_flat_scene_and_a_clip_of_one_colour_whole():
    black = torch.full((4, 60, 80, 3), 10, dtype=torch.uint8)
    assert constant_borders(black) == (0, 0, 0, 0)  # all "bar": left whole, for the static-camera check
    wall = _frames(4, 60, 80)
    wall[:, :20] = 128  # a flat grey wall or a clear sky over the top of every frame is scene, not a bar
    assert constant_borders(wall) == (0, 0, 0, 0)
    wall[:, :20] = 30  # a dark grey bar is one
    assert constant_borders(wall) == (22, 0, 0, 0)
    noise = _frames(4, 60, 80)
    noise[:, :40] = 0  # bars that would leave a third of the frame are not counted on that axis
    assert constant_borders(noise) == (0, 0, 0, 0)
    noise[:, :20] = 0
    noise[:, 20:40] = _frames(4, 20, 80)
    assert constant_borders(noise) == (22, 0, 0, 0)


def test_shot_cuts_find_a_cut_to_another_scene_through_a_lossy_codec(tmp_path):
    orbit = render_video("boxes", "orbit", frames=24, size=(180, 240)).frames
    other = false_colour(render_video("room", "truck", frames=24, size=(180, 240)).frames)
    assert shot_cuts(orbit) == [] and shot_cuts(other) == []
    cut = torch.cat([orbit[:16], other[16:]])
    assert shot_cuts(cut) == [16]
    assert shot_cuts(load_video(write_video(tmp_path / "cut.mp4", cut)).frames) == [16]
    assert shot_cuts(torch.cat([orbit[:8], other[8:16], orbit[16:]])) == [8, 16]  # and back
    assert shot_cuts(torch.cat([orbit[:23], other[23:]])) == [23]  # the last frame: nothing after it says otherwise


def test_shot_cuts_leave_a_flash_an_odd_frame_a_fade_and_wide_views_of_one_scene_alone():
    orbit = render_video("boxes", "orbit", frames=24, size=(180, 240)).frames
    other = false_colour(render_video("room", "truck", frames=24, size=(180, 240)).frames)
    flash = orbit.clone()
    flash[10] = (flash[10].float() * 1.8).clamp(0, 255).to(torch.uint8)
    odd = orbit.clone()
    odd[10] = other[10]  # one frame of another scene: the frames on either side of it still match
    fade = orbit.clone()
    fade[:4] = 0  # black, then fading in: no scene to cut from
    for k in range(4, 8):
        fade[k] = (fade[k].float() * (k - 3) / 5).to(torch.uint8)
    wide = render_video("boxes", "orbit", frames=5, size=(180, 240)).frames  # the whole orbit in 5 views
    for frames in (flash, odd, fade, wide, orbit[:1]):
        assert shot_cuts(frames) == []


def test_shot_cuts_on_real_footage(shared_data):
    """Real captures of views up to 45 degrees apart are one shot each; a real clip cut into another is two."""
    for name in ("statue", "kitchen"):
        assert shot_cuts(load_video(shared_data / "real" / name).frames) == [], name
    bear = load_video(shared_data / "real-dynamic" / "bear.mp4", wanted=lambda n: range(0, n, 4)).frames
    backpack = load_video(shared_data / "real-dynamic" / "backpack.mp4", wanted=lambda n: range(0, n, 4)).frames
    height, width = min(bear.shape[1], backpack.shape[1]), min(bear.shape[2], backpack.shape[2])
    bear, backpack = bear[:, :height, :width], backpack[:, :height, :width]
    assert shot_cuts(bear) == [] and shot_cuts(backpack) == []
    assert shot_cuts(torch.cat([bear[:10], backpack[10:]])) == [10]


def test_static_overlay_finds_a_caption_fixed_to_the_screen_and_nothing_of_the_scene(tmp_path):
    orbit = render_video("boxes", "orbit", frames=12, size=(180, 240)).frames
    assert not static_overlay(orbit).any()
    captioned, letters = with_caption(orbit, scale=2.0)
    near_letters = torch.nn.functional.max_pool2d(letters[None, None].float(), 13, 1, 6)[0, 0] > 0
    for frames in (captioned, load_video(write_video(tmp_path / "captioned.mp4", captioned)).frames):
        mask = static_overlay(frames)
        assert mask[letters].float().mean() > 0.99, "the letters are found (all but a few codec-blurred edge pixels)"
        assert bool(near_letters[mask].all()), "and nothing further than 6 px from them"
    flicker = (captioned.float() * torch.linspace(0.75, 1.0, 12).view(12, 1, 1, 1)).round().to(torch.uint8)
    assert static_overlay(flicker)[letters].float().mean() > 0.95  # drawn into frames whose exposure changes
    still, _ = with_caption(render_video("boxes", "static", frames=12, size=(180, 240)).frames, scale=2.0)
    assert not static_overlay(still).any()  # a still camera: everything stands still, nothing to tell apart


def test_inpainted_fills_only_the_mask_from_around_it():
    orbit = render_video("boxes", "orbit", frames=3, size=(180, 240)).frames
    captioned, letters = with_caption(orbit, scale=2.0)
    filled = inpainted(captioned, letters)
    assert torch.equal(filled[:, ~letters], captioned[:, ~letters])
    # The white letters are gone: what fills them is close to the scene they hid.
    assert (filled[:, letters].float() - orbit[:, letters].float()).abs().mean() < 0.3 * (captioned[:, letters].float() - orbit[:, letters].float()).abs().mean()
    assert inpainted(orbit, torch.zeros(180, 240, dtype=torch.bool)) is orbit


def test_uniform_indices_cover_the_whole_video():
    assert uniform_indices(49, 10) == [0, 5, 11, 16, 21, 27, 32, 37, 43, 48]
    assert uniform_indices(5, 10) == [0, 1, 2, 3, 4]
    assert uniform_indices(2, 2) == [0, 1]


def test_resize_keeps_aspect_and_full_frame():
    assert resized_size(480, 720, 720) == (480, 720)
    assert resized_size(1080, 1920, 720) == (406, 720)
    assert resized_size(1920, 1080, 720) == (720, 406)  # portrait: no crop, long side capped


def test_ffv1_round_trip_is_exact_and_wanted_selects(tmp_path):
    frames = _frames()
    path = write_video(tmp_path / "v.mkv", frames, lossless=True)
    video = load_video(path, wanted=lambda n: [0, n - 1])
    assert video.total_frames == 6 and video.indices == [0, 5]
    assert torch.equal(video.frames, frames[[0, 5]])
    assert to_float(video.frames).max() <= 1.0


def test_h264_writes_are_repeatable(tmp_path):
    # libx264's MB-tree made two writes of these frames (170 px wide) differ in their pictures.
    frames = render_video("boxes", "orbit", frames=16, size=(120, 170)).frames
    first = load_video(write_video(tmp_path / "a.mp4", frames)).frames
    for name in ("b.mp4", "c.mp4", "d.mp4"):
        assert torch.equal(load_video(write_video(tmp_path / name, frames)).frames, first)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"])
def test_reads_common_containers(tmp_path, suffix):
    frames = _frames(n=5)
    path = tmp_path / f"v{suffix}"
    codec = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx", ".avi": "mpeg4", ".gif": "gif"}[suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=5)
        stream.width, stream.height = 48, 32
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for image in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = load_video(path)
    assert video.total_frames == 5 and video.frames.shape == (5, 32, 48, 3)


def test_image_folder_in_natural_order_and_zip(tmp_path):
    frames = _frames(n=11)
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2

    for i, image in enumerate(frames.numpy()):  # 1.png, 2.png, ..., 11.png: natural, not lexical, order
        cv2.imwrite(str(folder / f"{i + 1}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    video = load_video(folder)
    assert torch.equal(video.frames, frames)
    archive = tmp_path / "frames.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in folder.iterdir():
            z.write(p, p.name)
    assert torch.equal(load_video(archive).frames, frames)


def test_arrays_uint8_and_float(tmp_path):
    frames = _frames(n=3)
    assert torch.equal(load_video(frames).frames, frames)
    assert torch.equal(load_video(frames.float() / 255).frames, frames)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        load_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(NotAVideoError, match="not a video"):
        load_video(text)
    one = write_video(tmp_path / "one.mkv", _frames(n=1), lossless=True)
    with pytest.raises(TooFewFramesError, match="at least 2"):
        load_video(one)
    big = write_video(tmp_path / "big.mkv", _frames(n=2), lossless=True)
    with pytest.raises(InputTooLargeError, match="resolution"):
        load_video(big, max_input_side=40)
    with pytest.raises(InputTooLargeError, match="frames is over the limit"):
        load_video(write_video(tmp_path / "long.mkv", _frames(n=6), lossless=True), max_input_frames=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAVideoError, match="holds no images"):
        load_video(empty)
    write_image_folder(tmp_path / "mixed", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])
    with pytest.raises(NotAVideoError, match="share one size"):
        load_video(tmp_path / "mixed")


def test_truncated_video_is_an_error_not_a_crash(tmp_path):
    path = write_video(tmp_path / "v.mp4", _frames(n=20, h=64, w=64))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises((CorruptVideoError, NotAVideoError)) as err:
        load_video(cut)
    assert "cut.mp4" in str(err.value)


# ---- hostile input: every limit holds before the pixels it guards are decoded -----------------------
from tests.services.hostile import (  # noqa: E402
    clip,
    cut_in_half,
    lying_zip,
    many_entries_zip,
    png_bomb,
    png_with_garbage_pixels,
    zeros_zip,
    zip_of,
)


@pytest.mark.parametrize("name,options", [("end.mp4", {}), ("front.mp4", {"movflags": "faststart"}),
                                          ("end.mkv", {}), ("front.mkv", {"reserve_index_space": "20000"})])
def test_truncated_video_is_422_whichever_end_holds_the_index(tmp_path, name, options):
    whole = clip(tmp_path / name, **options)
    assert load_video(whole).total_frames == 20
    with pytest.raises(CorruptVideoError, match="truncated") as err:
        load_video(cut_in_half(whole, tmp_path / f"half-{name}"))
    assert err.value.http_status == 422


def test_image_size_is_checked_from_the_header(tmp_path):
    bomb = png_bomb(9000, 9000)  # 243 MB of pixels in a few hundred bytes
    with pytest.raises(InputTooLargeError, match="resolution"):
        load_video(zip_of(tmp_path / "bombs.zip", {"0.png": bomb, "1.png": bomb}))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "0.png").write_bytes(bomb)
    (folder / "1.png").write_bytes(bomb)
    with pytest.raises(InputTooLargeError, match="resolution"):
        load_video(folder)


def test_opencv_pixel_limit_is_set_before_cv2_loads():
    import cv2

    # 20000 x 20000 is over the 2**28-pixel limit that common/__init__.py sets: refused, not decoded.
    with pytest.raises(cv2.error):
        cv2.imdecode(np.frombuffer(png_bomb(20000, 20000), np.uint8), cv2.IMREAD_COLOR)


def test_zip_members_are_capped_by_declared_and_inflated_size(tmp_path):
    with pytest.raises(InputTooLargeError, match="declares"):
        load_video(zeros_zip(tmp_path / "bomb.zip", 100 << 20))
    # Declares 1000 bytes, inflates to 100 MiB: reading stops at the cap (zipfile itself stops at the
    # declared size, and the CRC then fails), nothing near 100 MiB is ever held.
    with pytest.raises(CorruptVideoError, match="damaged"):
        load_video(lying_zip(tmp_path / "liar.zip"))
    with pytest.raises(InputTooLargeError, match="entries"):
        load_video(many_entries_zip(tmp_path / "many.zip", entries=200), max_input_frames=50)


def test_zip64_entry_count_is_read(tmp_path):
    from common.video import _zip_entry_count

    assert _zip_entry_count(zeros_zip(tmp_path / "z64.zip", 5_000_000_000, count=3)) == 3


def test_decoder_errors_are_422(tmp_path):
    broken = png_with_garbage_pixels()
    with pytest.raises(CorruptVideoError):
        load_video(zip_of(tmp_path / "broken.zip", {"0.png": broken, "1.png": broken}))
    with pytest.raises(CorruptVideoError, match="cannot be read as an image"):
        load_video(zip_of(tmp_path / "junk.zip", {"0.png": b"junk", "1.png": b"junk"}))


def test_file_type_comes_from_the_first_bytes(tmp_path):
    from common.containers import sniff_file

    assert sniff_file(clip(tmp_path / "a.mp4")) == "mp4"
    assert sniff_file(clip(tmp_path / "a.mkv")) == "matroska"
    renamed = tmp_path / "really-an-mkv.bin"
    renamed.write_bytes((tmp_path / "a.mkv").read_bytes())
    assert load_video(renamed).total_frames == 20  # the name does not matter
    image = tmp_path / "one.png"
    image.write_bytes(png_bomb(40, 30))
    with pytest.raises(TooFewFramesError, match="single png image"):
        load_video(image)


def test_deadline_scope_stops_decoding(tmp_path):
    import threading

    from common.deadline import deadline_scope
    from common.errors import DeadlineExceededError

    video = clip(tmp_path / "v.mp4")
    with deadline_scope(None, threading.Event()):
        assert load_video(video).total_frames == 20  # not cancelled: decodes
    cancelled = threading.Event()
    cancelled.set()
    with deadline_scope(None, cancelled), pytest.raises(DeadlineExceededError):
        load_video(video)
    with deadline_scope(0.0), pytest.raises(DeadlineExceededError):  # long past
        load_video(video)
    assert load_video(video).total_frames == 20  # outside any scope: no deadline


# ---- frames as a player shows them: EXIF orientation, display rotation, sample aspect ratio ----------


def _marked(n=3, h=32, w=64):
    """Frames black but for a white 8x8 block in the stored top-left corner."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:, :8, :8] = 255
    return frames


def _white_centre(frame) -> tuple[float, float]:
    ys, xs = np.nonzero(torch.as_tensor(frame).numpy().mean(-1) > 128)
    return float(ys.mean()), float(xs.mean())


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_images_are_shown_as_their_exif_orientation_says(tmp_path, container):
    """Phone photos are stored landscape with an orientation tag: every one of the eight tags gives the
    picture PIL's ImageOps.exif_transpose shows, and a capture mixing tagged and turned images of one
    shown size is one video. (Before, cv2 turned the pixels and the header's size did not: "cannot read".)"""
    from PIL import Image, ImageOps

    stored = _frames(1, 30, 50)[0].numpy()
    for orientation in range(1, 9):
        folder = tmp_path / f"{container}-{orientation}"
        folder.mkdir()
        exif = Image.Exif()
        exif[0x0112] = orientation
        for i in range(2):
            Image.fromarray(stored).save(folder / f"{i}.jpg" if orientation == 6 else folder / f"{i}.png",
                                         exif=exif.tobytes(), **({"quality": 100} if orientation == 6 else {}))
        first = next(iter(sorted(folder.iterdir())))
        expected = np.asarray(ImageOps.exif_transpose(Image.open(first)).convert("RGB"))
        source = folder
        if container == "zip":
            source = tmp_path / f"{orientation}.zip"
            with zipfile.ZipFile(source, "w") as archive:
                for f in sorted(folder.iterdir()):
                    archive.write(f, f.name)
        video = load_video(source, max_side=1000)
        assert video.source_size == expected.shape[:2] and tuple(video.frames.shape[1:3]) == expected.shape[:2]
        assert np.array_equal(video.frames[0].numpy(), expected), orientation
    # A tagged portrait photo beside one stored upright: the same shown size, one video.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    Image.fromarray(stored).save(mixed / "0.png", exif=exif.tobytes())
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, -1))).save(mixed / "1.png")
    video = load_video(mixed, max_side=1000)
    assert video.source_size == (50, 30) and torch.equal(video.frames[0], video.frames[1])


def test_a_rotated_video_is_shown_upright(tmp_path):
    """A phone held upright records landscape pixels and a display rotation of -90 degrees (turn 90
    degrees clockwise to show, ffmpeg's autorotate): frames come portrait, the stored top-left corner
    at the top right. A rotation that is no quarter turn is left alone, as ffmpeg leaves it."""
    portrait = load_video(write_video(tmp_path / "portrait.mp4", _marked(), display_rotation=-90))
    assert portrait.source_size == (64, 32) and tuple(portrait.frames.shape[1:3]) == (64, 32)
    y, x = _white_centre(portrait.frames[0])
    assert y < 8 and x > 32 - 8
    upside_down = load_video(write_video(tmp_path / "180.mp4", _marked(), display_rotation=180))
    y, x = _white_centre(upside_down.frames[0])
    assert upside_down.source_size == (32, 64) and y > 32 - 8 and x > 64 - 8
    tilted = load_video(write_video(tmp_path / "45.mp4", _marked(), display_rotation=45))
    assert tilted.source_size == (32, 64) and _white_centre(tilted.frames[0])[1] < 8


def test_anamorphic_video_is_shown_with_square_pixels(tmp_path):
    """Pixels 3/2 as wide as high (sample aspect ratio 3:2) are shown 1.5x as wide, as players show them;
    within the size limit too. A ratio no picture has is damaged metadata: a clear error, not a frame
    stretched 16 times."""
    video = load_video(write_video(tmp_path / "sar.mp4", _marked(w=48), sample_aspect_ratio="3/2"))
    assert video.source_size == (32, 72) and tuple(video.frames.shape[1:3]) == (32, 72)
    assert _white_centre(video.frames[0])[1] == pytest.approx(5.5, abs=1.5)  # the 8 px block, now 12 px wide
    small = load_video(tmp_path / "sar.mp4", max_side=36)
    assert small.source_size == (32, 72) and tuple(small.frames.shape[1:3]) == (16, 36)
    narrow = load_video(write_video(tmp_path / "narrow.mp4", _marked(w=48), sample_aspect_ratio="8/9"))
    assert narrow.source_size == (32, 43)
    with pytest.raises(CorruptVideoError, match="sample aspect ratio 16:1 is not a picture's"):
        load_video(write_video(tmp_path / "absurd.mp4", _marked(w=48), sample_aspect_ratio="16"))
