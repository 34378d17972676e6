"""Videos too short for the clips a config samples: named, and padded only when asked.

A clip of ``num_frames`` frames ``frame_stride`` apart spans
``(num_frames - 1) * frame_stride + 1`` frames of its video
(:func:`frames_needed`). The clip samplers repeat a short video's last frame
to fill a clip; :func:`check_clip_lengths` makes that a choice
(``config.pad_short_clips``) instead of something that happens silently.
"""

from __future__ import annotations

from collections.abc import Mapping

from absl import logging

# At most this many videos are named in a message; the rest are counted.
MAX_NAMED = 10
# The key of the video builders' ``info.metadata`` holding {split: {video name: frames}}.
FRAME_COUNTS = "num_frames"


def frames_needed(num_frames: int, frame_stride: int) -> int:
  """Frames of a video a clip of `num_frames` frames `frame_stride` apart spans."""
  if num_frames < 0 or frame_stride < 1:
    raise ValueError(f"num_frames must be >= 0 and frame_stride >= 1, got num_frames={num_frames}, "
                     f"frame_stride={frame_stride}")
  return (num_frames - 1) * frame_stride + 1 if num_frames else 0


def stored_frame_counts(metadata: Mapping, split: str) -> dict[str, int] | None:
  """{video name: frames} of `split` as our video builders store them, or None.

  `metadata` is ``builder.info.metadata``; `split` may carry a slice
  (``'train[:90%]'``: the whole train split's counts). None when the data
  was prepared without them (before the builders stored them, or another
  builder): then collect the ``video_id`` / ``num_frames`` features instead.
  """
  base = split.split("[", 1)[0]
  try:  # [] rather than .get(): TFDS loads metadata.json lazily, on [] / keys() / items()
    return dict(metadata[FRAME_COUNTS][base])
  except (KeyError, TypeError):
    return None


def check_clip_lengths(num_frames_by_id: Mapping[str, int], needed: int, pad: bool, *,
                       split: str = "") -> list[str]:
  """Names the videos shorter than `needed` frames; an error unless `pad`.

  Args:
    num_frames_by_id: {video id: its number of frames} of the videos of a split.
    needed: the frames a clip spans (:func:`frames_needed`); 0 or 1 checks nothing.
    pad: ``config.pad_short_clips``: True logs a warning naming the short
      videos (their last frame is repeated), False raises.
    split: the split's name, for the messages.

  Returns:
    The ids of the short videos, shortest first (then by id).

  Raises:
    ValueError: some videos are shorter than `needed` and `pad` is False; it
      names up to MAX_NAMED of them with their lengths and counts the rest.
  """
  short = sorted(((int(n), video_id) for video_id, n in num_frames_by_id.items() if n < needed))
  if not short:
    return []
  named = ", ".join(f"{video_id} ({n} frames)" for n, video_id in short[:MAX_NAMED])
  if len(short) > MAX_NAMED:
    named += f" and {len(short) - MAX_NAMED} more"
  where = f" of split {split!r}" if split else ""
  summary = (f"{len(short)} of the {len(num_frames_by_id)} videos{where} are shorter than the "
             f"{needed} frames a clip spans ((config.input.num_frames - 1) * "
             f"config.input.frame_stride + 1): {named}")
  if not pad:
    raise ValueError(f"{summary}. Set config.pad_short_clips=True to repeat their last frame to "
                     "fill the clip, or lower config.input.num_frames or frame_stride, or remove "
                     "the videos.")
  logging.warning("%s; their last frame is repeated to fill the clip (config.pad_short_clips=True)",
                  summary)
  return [video_id for _, video_id in short]
