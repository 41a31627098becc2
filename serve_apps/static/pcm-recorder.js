// AudioWorklet: forwards the microphone's mono float32 samples to the page in ~100 ms blocks.
class PcmRecorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = [];
    this.size = 0;
    this.target = Math.round(sampleRate / 10);
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      this.block.push(new Float32Array(ch));
      this.size += ch.length;
      if (this.size >= this.target) {
        const out = new Float32Array(this.size);
        let o = 0;
        for (const b of this.block) { out.set(b, o); o += b.length; }
        this.port.postMessage(out, [out.buffer]);
        this.block = [];
        this.size = 0;
      }
    }
    return true;
  }
}
registerProcessor("pcm-recorder", PcmRecorder);
