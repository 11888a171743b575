"""What an audio file that decodes without an error still lost.

libsndfile reads a WAV or AIFF copy cut short, an Ogg file cut short, an MP3 cut short and an
Ogg stream with damaged pages without a word: it returns what is there. This module says so,
in one phrase for a warning (:func:`damage_note`), from the file's headers and, where a file
declares its length, from the number of frames the decoder returned (:func:`decode_shortfall`).
It reads headers and the last Ogg page or the MP3 frame headers, never the samples.
"""

from __future__ import annotations

import dataclasses
import os
import re

SHORTFALL_SECONDS = 0.1
"""Audio a file declares but does not decode, from which :func:`shortfall_note` speaks up (an
MP3's encoder delay and padding move its count by a few milliseconds, never this much)."""


def damage_note(path: str | os.PathLike, *, decoded_frames: int | None = None) -> str | None:
    """What a file that decodes without an error still lost, in one phrase; None when nothing
    is known to be missing:

    * a WAV or AIFF file whose data chunk is shorter than its header declares (a copy cut short);
    * an Ogg file (Vorbis, Opus) that ends inside a page, or without its end-of-stream page
      (cut short: an Ogg file declares no length, so its last page is the only witness);
    * given ``decoded_frames`` (what the decoder returned, at the file's rate), whatever
      :func:`decode_shortfall` finds.

    Only a regular file is looked at (reading a pipe here would take samples from its reader).
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        info = sf.info(path)
    except Exception:  # unreadable: audio.read_audio says why
        return None
    note = _header_note(info.extra_info)
    if note is None and info.format == "OGG":
        note = _ogg_end_note(path)
    if note is None and decoded_frames is not None:
        note = decode_shortfall(path, decoded_frames, info=info)
    return note


def decode_shortfall(path: str | os.PathLike, decoded_frames: int, *, info=None) -> str | None:
    """A phrase when the decoder returned :data:`SHORTFALL_SECONDS` or more less than the file
    holds, by what it declares (an Ogg stream whose damaged pages the decoder skipped; an MP3
    cut short, whose Xing/Info header holds the length), or for an MP3 without such a header, by
    its frame headers (libsndfile then estimates the length from the first frame's bit rate
    and stops there: a variable-bit-rate file loses its end). None otherwise, and for a file
    that is not regular."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    if info is None:
        try:
            info = sf.info(path)
        except Exception:
            return None
    if info.format != "MP3":
        return shortfall_note(info.frames, decoded_frames, info.samplerate)
    walk = mp3_frames(path, count_all=False)  # most MP3s declare their length: no walk then
    if walk is None or walk.length_header:  # the header's length: libsndfile's frames
        return shortfall_note(info.frames, decoded_frames, info.samplerate)
    # Frame headers overcount by the encoder delay and padding (up to ~2 frames) and a frame.
    slack = 4 * walk.samples_per_frame / walk.sample_rate
    present = walk.frames * walk.samples_per_frame
    if present - decoded_frames < max(SHORTFALL_SECONDS, slack) * walk.sample_rate:
        return None
    return (
        f"its MP3 frames hold {present / walk.sample_rate:.2f} s of audio but "
        f"{decoded_frames / walk.sample_rate:.2f} s decode (an MP3 without a Xing/Info header: "
        "libsndfile guesses its length; convert it to WAV or FLAC)"
    )


def shortfall_note(declared_frames: int, decoded_frames: int, rate: int) -> str | None:
    """A phrase when the decoder returned :data:`SHORTFALL_SECONDS` or more less than the file
    declares ("the header declares X s of audio but Y s decode (cut short or damaged?)"); None
    otherwise."""
    if rate <= 0 or declared_frames - decoded_frames < SHORTFALL_SECONDS * rate:
        return None
    return (
        f"the header declares {declared_frames / rate:.2f} s of audio but "
        f"{decoded_frames / rate:.2f} s decode (cut short or damaged?)"
    )


# --------------------------------------------------------------------------------------------
# WAV / AIFF: libsndfile's header dump
# --------------------------------------------------------------------------------------------


def _header_note(extra: str) -> str | None:
    """A WAV's or AIFF's data chunk shorter than declared, from libsndfile's header dump."""
    wav = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", extra, re.MULTILINE)
    per_second = re.search(r"Bytes/sec\s*:\s*(\d+)", extra)
    if wav and per_second and int(per_second.group(1)) > 0:
        declared, present = int(wav.group(1)), int(wav.group(2))
        per = int(per_second.group(1))
        if declared >= 0x7FFF0000:  # a WAV streamed to a pipe: size unknown
            return None
    else:
        aiff = re.search(
            r"Frame count read from 'COMM' chunk \((\d+)\) not equal to frame count\s*"
            r"\*+\s*calculated from length of 'SSND' chunk \((\d+)\)",
            extra,
        )
        rate = re.search(r"Sample Rate\s*:\s*(\d+)", extra)
        if not aiff or not rate or int(rate.group(1)) <= 0:
            return None
        declared, present, per = int(aiff.group(1)), int(aiff.group(2)), int(rate.group(1))
    if declared <= present:
        return None
    return (
        f"the header declares {declared / per:.2f} s of audio but the file holds "
        f"{present / per:.2f} s (cut short?)"
    )


# --------------------------------------------------------------------------------------------
# Ogg: the last page
# --------------------------------------------------------------------------------------------

_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header, segment table, body


def _ogg_end_note(path: str) -> str | None:
    """An Ogg file cut short: its last page is incomplete or lacks the end-of-stream flag."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _OGG_MAX_PAGE))
        tail = f.read()
    base = size - len(tail)
    at = tail.rfind(b"OggS")
    while at >= 0 and tail[at + 4 : at + 5] != b"\x00":  # not a version-0 page header
        at = tail.rfind(b"OggS", 0, at)
    if at < 0:
        return None  # no page in the last 64 KiB: not for this check to judge
    nseg = tail[at + 26] if at + 27 <= len(tail) else None
    end = None
    if nseg is not None and at + 27 + nseg <= len(tail):
        end = at + 27 + nseg + sum(tail[at + 27 : at + 27 + nseg])
    if end is None or end > len(tail):
        return f"the file ends inside an Ogg page, at byte {size} (cut short?)"
    if not tail[at + 5] & 0x04:
        return f"the Ogg stream stops at byte {base + end} without its end page (cut short?)"
    return None


# --------------------------------------------------------------------------------------------
# MP3 (MPEG-1/2/2.5 Layer III): the frame headers
# --------------------------------------------------------------------------------------------

_MP3_KBPS = {  # bit-rate index 1..14 (0: free format, 15: invalid)
    1: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


@dataclasses.dataclass(frozen=True)
class Mp3Frames:
    """An MP3 file's Layer III frames, counted from their headers.

    Attributes:
      frames: frames found from the first to the last (a lost sync ends the count); None when
        not counted (:func:`mp3_frames` with ``count_all=False`` on a file with a length header).
      samples_per_frame: 1152 (MPEG-1) or 576 (MPEG-2, 2.5).
      sample_rate: Hz, from the first frame.
      length_header: the first frame is a Xing, Info or VBRI header, which declares the length.
    """

    frames: int | None
    samples_per_frame: int
    sample_rate: int
    length_header: bool


def _mp3_header(data: bytes, at: int):
    """(frame bytes, samples per frame, rate) of a Layer III frame header at ``at``, or None."""
    if at + 4 > len(data) or data[at] != 0xFF or (data[at + 1] & 0xE0) != 0xE0:
        return None
    version = (data[at + 1] >> 3) & 3  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5, 1: reserved
    layer = (data[at + 1] >> 1) & 3  # 1: Layer III
    bitrate_index, rate_index = data[at + 2] >> 4, (data[at + 2] >> 2) & 3
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    kbps = _MP3_KBPS[1 if version == 3 else 2][bitrate_index - 1]
    rate = _MP3_RATES[version][rate_index]
    per = 1152 if version == 3 else 576
    padding = (data[at + 2] >> 1) & 1
    return (per // 8) * kbps * 1000 // rate + padding, per, rate


def mp3_frames(path: str | os.PathLike, *, count_all: bool = True) -> Mp3Frames | None:
    """Counts an MP3 file's frames by their headers (an ID3v2 tag skipped); None when no
    Layer III frame is found where the audio should begin. ``count_all=False``: not when the
    first frame is a length header (``frames`` is then None: the header says the length)."""
    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while data[at : at + 3] == b"ID3" and at + 10 <= len(data):  # ID3v2 tags, synchsafe sizes
        size = 0
        for byte in data[at + 6 : at + 10]:
            size = (size << 7) | (byte & 0x7F)
        at += 10 + size + (10 if data[at + 5] & 0x10 else 0)
    limit = min(len(data), at + 65536)  # junk before the first frame
    while at < limit and _mp3_header(data, at) is None:
        at += 1
    first = _mp3_header(data, at)
    if first is None:
        return None
    length, per, rate = first
    header = data[at : at + length]
    length_header = any(tag in header for tag in (b"Xing", b"Info", b"VBRI"))
    if length_header and not count_all:
        return Mp3Frames(None, per, rate, length_header)
    frames = 0
    while True:
        head = _mp3_header(data, at)
        if head is None or head[1:] != (per, rate) or at + head[0] > len(data):
            break
        frames += 1
        at += head[0]
    return Mp3Frames(frames, per, rate, length_header)
