"""Server VAD's decisions (``serve_apps/vad.py``) on given speech probabilities, without the Silero model or
a server: where speech starts (with its padding), the hysteresis, where it stops. The model itself runs in
``tests/test_realtime.py``'s server VAD test."""

from __future__ import annotations

from serve_apps.vad import WINDOW_MS, SpeechDetector, SpeechStarted, SpeechStopped, TurnDetection


def test_speech_starts_at_the_threshold_and_stops_after_the_silence():
    td = TurnDetection(threshold=0.5, prefix_padding_ms=64, silence_duration_ms=96)
    det = SpeechDetector(vad=None, at_ms=0)
    probs = [0.1, 0.1, 0.1, 0.9, 0.8, 0.4, 0.2, 0.1, 0.1, 0.9]  # window i ends at 32 * (i + 1) ms
    said = [det.step(p, td, kept_ms=0, appended_ms=10_000) for p in probs]
    assert said[:3] == [None] * 3
    started = said[3]
    assert isinstance(started, SpeechStarted) and started.start_ms == 3 * WINDOW_MS - 64  # its window, padded
    # 0.4 is under the threshold but not under threshold - 0.15: still speech; then 3 silent windows (96 ms)
    assert said[4:8] == [None] * 4
    assert said[8] == SpeechStopped(started.start_ms, 9 * WINDOW_MS, started.item_id)
    again = said[9]
    assert isinstance(again, SpeechStarted) and again.start_ms == 9 * WINDOW_MS - 64
    assert again.item_id != started.item_id
    assert det.padding_from_ms(td) == 10 * WINDOW_MS - 64


def test_the_padding_stays_in_the_buffer_and_the_end_in_the_audio():
    td = TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=32)
    det = SpeechDetector(vad=None, at_ms=1000)  # switched on after a second of audio
    started = det.step(0.9, td, kept_ms=900, appended_ms=1032)
    assert started.start_ms == 900  # 300 ms of padding would reach 700 ms: not before the buffer's first byte
    stopped = det.step(0.0, td, kept_ms=900, appended_ms=1050)
    assert stopped.end_ms == 1050 and det.start_ms is None  # judged to 1064 ms: no later than the audio appended
    det.step(0.9, td, kept_ms=1050, appended_ms=2000)
    det.forget()  # the client committed or cleared the buffer
    assert det.start_ms is None and det.step(0.0, td, kept_ms=0, appended_ms=2000) is None
