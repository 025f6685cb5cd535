"""Input readers for detect: an image, a folder, a glob, a video, a webcam, a stream URL or a list file.

``open_source(source)`` checks the source up front (a missing one raises :class:`UserError`) and
returns an iterable of :class:`Frame`. Inside a folder or list, an unreadable image is logged and
skipped; a dropped stream frame is logged and the stream goes on.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from utils.core.errors import UserError
from utils.core.log import LOGGER

IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".pfm", ".mpo"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm",
                            ".ts", ".asf", ".gif"})
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")
GLOB_CHARS = frozenset("*?[")
MAX_DROPPED_FRAMES = 30  # consecutive failed reads before a live stream counts as ended
DEFAULT_FPS = 30.0  # written to output videos when a capture does not report its rate


@dataclass
class Frame:
    """One image to run on: ``image`` is BGR ``[H, W, 3]`` uint8 as read (not resized).

    ``kind`` is ``image``, ``video`` or ``stream``; ``index`` is the frame number (0 for an image);
    ``fps`` and ``total`` (frame count, 0 when unknown) describe a video or stream.
    """

    path: str
    image: np.ndarray
    kind: str
    index: int = 0
    fps: float = 0.0
    total: int = 0


def read_image(path: str | Path) -> np.ndarray | None:
    """Read a BGR image (also from non-ASCII paths); None when the file is not a decodable image."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _is_stream(entry: str) -> bool:
    return entry.isdigit() or entry.lower().startswith(STREAM_PREFIXES)


def _media_files(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]


def _read_list_file(list_file: Path) -> list[str]:
    """Entries of a ``.txt`` list: one path or URL per line, relative paths from the list's folder."""
    entries = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _is_stream(line):
            entries.append(line)
            continue
        path = Path(line).expanduser()
        if not path.is_absolute() and not path.exists():
            path = list_file.parent / path
        entries.append(str(path))
    return entries


def resolve_source(source: str | int | Path) -> list[str]:
    """Expand ``source`` into entries: file paths, URLs, or webcam indices as digit strings.

    Raises :class:`UserError` when nothing can be read from ``source``.
    """
    text = str(source).strip()
    if not text:
        raise UserError("--source is empty: give an image, folder, glob, video, webcam index, URL or .txt list")
    if _is_stream(text):
        return [text]
    path = Path(text).expanduser()
    if GLOB_CHARS & set(text) and not path.exists():
        entries = _media_files(sorted(Path(p) for p in glob.glob(str(path), recursive=True)))
        if not entries:
            raise UserError(f"--source {text}: the pattern matches no image or video files")
        return entries
    if path.is_dir():
        entries = _media_files(sorted(path.iterdir()))
        if not entries:
            raise UserError(f"--source {text}: the folder holds no image or video files")
        return entries
    if not path.is_file():
        raise UserError(f"--source {text} does not exist (no such file, folder or glob match)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        entries = _read_list_file(path)
        if not entries:
            raise UserError(f"--source {text}: the list file names no images")
        return entries
    if suffix not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
        raise UserError(f"--source {text}: unsupported file type '{path.suffix}' "
                        "(use an image, a video or a .txt list)")
    return [str(path)]


class Source:
    """Iterates over the frames of every entry of a source in order."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = entries
        self.is_live = any(_is_stream(e) for e in entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Frame]:
        for entry in self.entries:
            if _is_stream(entry):
                yield from self._read_capture(entry, "stream")
            elif Path(entry).suffix.lower() in VIDEO_SUFFIXES:
                yield from self._read_capture(entry, "video")
            else:
                image = read_image(entry)
                if image is None:
                    LOGGER.warning(f"WARNING: cannot read image {entry}, skipped")
                    continue
                yield Frame(entry, image, "image")

    @staticmethod
    def _open_capture(entry: str, kind: str) -> cv2.VideoCapture | None:
        capture = cv2.VideoCapture(int(entry) if entry.isdigit() else entry)
        if capture.isOpened():
            return capture
        capture.release()
        if kind == "stream":  # a live source that does not open is the user's to fix
            what = f"webcam {entry}" if entry.isdigit() else "the stream"
            raise UserError(f"--source {entry}: cannot open {what}")
        LOGGER.warning(f"WARNING: cannot open video {entry}, skipped")
        return None

    def _read_capture(self, entry: str, kind: str) -> Iterator[Frame]:
        capture = self._open_capture(entry, kind)
        if capture is None:
            return
        fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if kind == "video" else 0
        index, dropped = 0, 0
        try:
            while True:
                ok, image = capture.read()
                if not ok or image is None:
                    if kind == "video":
                        if total and index < total - 1:
                            LOGGER.warning(f"WARNING: {entry}: frame {index} of {total} unreadable, video ended early")
                        break
                    dropped += 1
                    if dropped > MAX_DROPPED_FRAMES:
                        LOGGER.warning(f"WARNING: {entry}: {MAX_DROPPED_FRAMES} frames in a row dropped, stream ended")
                        break
                    LOGGER.warning(f"WARNING: {entry}: dropped frame {index}, going on")
                    index += 1
                    continue
                dropped = 0
                yield Frame(entry, image, kind, index, float(fps), total)
                index += 1
        finally:
            capture.release()


def open_source(source: str | int | Path) -> Source:
    """Check and open ``source`` for reading; see :func:`resolve_source` for what is accepted."""
    return Source(resolve_source(source))
