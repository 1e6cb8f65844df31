"""Write rollouts to mp4 / gif with moviepy, every frame kept."""

from pathlib import Path

import numpy as np


def write_video(frames: list[np.ndarray], path, fps: int = 15, scale: int = 4) -> Path:
    """Frames (H, W, 3) uint8 -> an mp4 or gif at `path` (written to a temp name, then renamed).

    moviepy 2.2 drops the last frame when duration is n/fps exactly (rounding), so the duration is
    set a hair longer. Frames are upscaled by `scale` (nearest) so players show the pixels.
    """
    from moviepy import ImageSequenceClip

    path = Path(path)
    if path.suffix not in (".mp4", ".gif"):
        raise ValueError(f"video path must end in .mp4 or .gif, got {path.name}")
    if not frames:
        raise ValueError("no frames to write")
    frames = [np.repeat(np.repeat(f, scale, axis=0), scale, axis=1) for f in frames]
    if frames[0].shape[0] % 2 or frames[0].shape[1] % 2:
        raise ValueError("frame sizes must be even (odd sizes make yuv444p mp4s many players refuse)")
    clip = ImageSequenceClip(frames, fps=fps).with_duration(len(frames) / fps + 1e-6)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix == ".gif":
        clip.write_gif(str(tmp), fps=fps, logger=None)
    else:
        clip.write_videofile(str(tmp), fps=fps, codec="libx264", audio=False, logger=None,
                             ffmpeg_params=["-pix_fmt", "yuv420p"])
    tmp.replace(path)
    return path
