"""A festival process with one voice loaded, read through a pipe: loading a voice costs 0.5-1 s per `text2wave`
call, an utterance ~0.1 s, and a clip of several sentences makes one call per sentence. The process runs
text2wave's own steps (tts_file with a hook that saves each utterance), so its first utterance is text2wave's,
sample for sample; later ones may differ by a few LSB (festival keeps state), hence one process per clip
(`tts.one_reading`)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

_DONE = b"ASR_DISTILL_DONE"
# Run once per process: text2wave's settings, the voice, and a hook that saves utterance N to <asr_dir>/N.wav.
_SETUP = """(gc-status nil)
(voice_{voice})
(set! asr_default_stretch (Parameter.get 'Duration_Stretch))
(define (asr_save utt)
  (set! asr_n (+ asr_n 1))
  (utt.save.wave utt (format nil "%s/%04d.wav" asr_dir asr_n) 'riff))
"""
_SAY = """(set! asr_dir "{out_dir}")
(set! asr_n 0)
(Parameter.set 'Duration_Stretch {stretch})
(set! tts_hooks (list utt.synth asr_save))
(tts_file "{text_file}" (tts_find_text_mode "{text_file}" auto-text-mode-alist))
"""


class FestivalError(RuntimeError):
    """Festival reported an error, died or timed out; the message is its stderr."""


def _quoted(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace('"', '\\"')


class FestivalVoice:
    """A festival process with one voice loaded; `say` writes one wav per utterance of a text file."""

    def __init__(self, voice: str, timeout_s: float) -> None:
        self.voice, self.timeout_s = voice, timeout_s
        self.proc = subprocess.Popen(["festival", "--pipe"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.setup_log = self._call(_SETUP.format(voice=voice))

    def say(self, text_file: Path, out_dir: Path, stretch: float | None) -> list[Path]:
        """The utterances' wavs in order; `stretch` None keeps the voice's own Duration_Stretch."""
        log = self._call(_SAY.format(out_dir=_quoted(out_dir), text_file=_quoted(text_file),
                                     stretch="asr_default_stretch" if stretch is None else f"{stretch:.4f}"))
        if "SIOD ERROR" in log:
            raise FestivalError(log.strip()[:300])
        return sorted(out_dir.glob("*.wav"))

    def _call(self, scheme: str) -> str:
        """Send Scheme, then read stderr up to the end marker the same call prints (stdout is block-buffered
        in a pipe; stderr is not)."""
        try:
            self.proc.stdin.write(f'{scheme}\n(format stderr "\\n{_DONE.decode()}\\n")\n'.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise FestivalError(f"festival ({self.voice}) exited with code {self.proc.poll()}") from None
        fd, out, deadline = self.proc.stderr.fileno(), b"", time.monotonic() + self.timeout_s
        while _DONE not in out:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                self.close()
                raise FestivalError(f"festival ({self.voice}) timed out after {self.timeout_s:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise FestivalError(f"festival ({self.voice}) exited: {out.decode(errors='replace').strip()[:300]}")
            out += chunk
        return out[:out.index(_DONE)].decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
