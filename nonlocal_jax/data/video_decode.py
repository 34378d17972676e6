"""Video files in, RGB frames out, with PyAV (its wheel carries FFmpeg's codecs).

Only the requested frames are converted to arrays, and decoding starts at the
key frame before the first of them (a seek), so a short clip of a long video
costs little more than the clip itself.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import av
import numpy as np


class VideoReadError(ValueError):
  """Data that is not a readable video; the message says why (the caller adds the file)."""


def probe(source: str | bytes | BinaryIO, verify: bool = False) -> tuple[int, float]:
  """(number of frames, frames per second) of the first video stream.

  With `verify`, also decodes the first frame and reads every packet (without
  decoding them), so a file cut short (fewer packets than the frames its
  header lists) is caught here rather than mid-training.
  Raises VideoReadError for data that is not a readable video.
  """
  if verify and not isinstance(source, (str, bytes, bytearray)):
    source = source.read()  # read twice below
  try:
    with av.open(_as_file(source)) as container:
      if not container.streams.video:
        raise VideoReadError("no video stream")
      stream = container.streams.video[0]
      fps = float(stream.average_rate or stream.guessed_rate or 30)
      num_frames = stream.frames
      if not num_frames:  # container without a frame count: count by decoding
        num_frames = sum(1 for _ in container.decode(stream))
      elif verify:
        packets = sum(1 for packet in container.demux(stream) if packet.size)
        if packets < num_frames:
          raise VideoReadError(f"cut short: {packets} of the {num_frames} frames its header "
                               "lists are in the file")
    if not num_frames:
      raise VideoReadError("no decodable frame")
    if verify:
      with av.open(_as_file(source)) as container:
        if next(container.decode(container.streams.video[0]), None) is None:
          raise VideoReadError("no decodable frame")
  except av.FFmpegError as e:  # its message names the input as '<none>' for bytes
    reason = getattr(e, "strerror", None) or str(e)
    raise VideoReadError(f"not a readable video ({reason})") from e
  return int(num_frames), fps


def decode_frames(source: str | bytes | BinaryIO, indices: np.ndarray,
                  fps: float | None = None) -> np.ndarray:
  """Frames `indices` (0-based, any order, repeats allowed) as (len(indices), H, W, 3) uint8.

  Indices past the end of the video repeat its last frame.
  """
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1 or not indices.size or indices.min() < 0:
    raise ValueError(f"indices must be a non-empty 1-D array of frame numbers >= 0, got {indices}")
  wanted = set(indices.tolist())
  last_wanted = int(indices.max())
  frames: dict[int, np.ndarray] = {}
  with av.open(_as_file(source)) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = fps or float(stream.average_rate or stream.guessed_rate or 30)
    first = int(indices.min())
    if first > 0 and stream.time_base:
      container.seek(int(first / rate / stream.time_base) + (stream.start_time or 0),
                     stream=stream, backward=True, any_frame=False)
    last_frame, last_index = None, -1
    for frame in container.decode(stream):
      index = (int(round(frame.time * rate)) if frame.time is not None else last_index + 1)
      index = max(index, last_index + 1)
      last_index = index
      if index in wanted or (index > last_wanted and not frames):
        frames[index] = frame.to_ndarray(format="rgb24")
      last_frame = frame
      if index >= last_wanted:
        break
    if not frames and last_frame is not None:
      frames[last_index] = last_frame.to_ndarray(format="rgb24")
  if not frames:
    raise ValueError("the video has no decodable frame")
  available = np.array(sorted(frames))
  # Nearest decoded frame at or before each index (after the end: the last frame).
  pick = available[np.clip(np.searchsorted(available, indices, side="right") - 1, 0, None)]
  return np.stack([frames[int(i)] for i in pick])


def encode_video(frames: np.ndarray, fps: int = 25, codec: str = "libx264") -> bytes:
  """(T, H, W, 3) uint8 -> an mp4 file as bytes (used to make test data)."""
  buffer = io.BytesIO()
  with av.open(buffer, mode="w", format="mp4") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "10", "g": "8"}
    for array in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buffer.getvalue()


def _as_file(source: str | bytes | BinaryIO | np.ndarray):
  if isinstance(source, np.ndarray):  # a 0-d bytes array from tf.numpy_function
    source = source.item()
  return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
