"""``deepomni export-hf``: a tiny checkpoint exported with its tokenizer and generation config loads offline in
transformers' Auto classes, tokenizes as ours, and decodes greedily as our text decoding; the
lm-evaluation-harness task helper writes prompts that encode to our prompts.

One tiny model (the tiny preset, untied head, weights re-drawn at non-trivial scales so greedy decoding has
no near-ties) is saved as a checkpoint and exported once through the command line, for the whole module.
"""

from __future__ import annotations

import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from deepomni.checkpoint import save_model
from deepomni.config import load_preset
from deepomni.data.sequences import INSTRUCTIONS
from deepomni.model.channels import CodecSpecial, TextSpecial
from deepomni.model.generate import GenerationConfig as OurGenerationConfig
from deepomni.model.generate import generate
from deepomni.model.hf import hf_tokenizer, import_hf
from deepomni.hf.cli import add_export_hf_command
from deepomni.hf.lm_eval import text_prompt
from deepomni.model.model import DeepOmniModel
from deepomni.model.prompt import user_turn
from deepomni.text import ByteTokenizer, HFTokenizer

SAMPLE = "Héllo, wörld! 42 + 日本\n\ttabs  <b>"
QA = [("What is the capital of France?", "Paris"), ("Name a prime number.", "Seven")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepomni")
    add_export_hf_command(p.add_subparsers(dest="cmd", required=True))
    return p


@torch.no_grad()
def tiny_model() -> DeepOmniModel:
    cfg = load_preset("tiny").replace(tie_word_embeddings=False)
    model = DeepOmniModel(cfg).init_weights(seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.startswith("speech."):
            continue
        z = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * z)
        elif name.startswith("embed.") or name.endswith("mlp.gate.weight"):
            p.copy_(0.5 * z)  # decisive logits and routing
        else:
            p.copy_(0.1 * z)
    return model


def write_data(root) -> None:
    """A prepared-data directory with only what the task helper reads."""
    d = root / "tokenized" / "split=test" / "status=ok"
    d.mkdir(parents=True)
    rows = [{"task": "text_qa", "question_text": q, "answer_text": a} for q, a in QA]
    rows.insert(1, {"task": "asr", "question_text": "hello", "answer_text": "hello"})
    pq.write_table(pa.Table.from_pylist(rows), d / "part-0.parquet")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model decodes fastest on one thread (and two threads thrash on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model()
    save_model(model, tmp / "ckpt")
    write_data(tmp / "data")
    args = parser().parse_args(["export-hf", "--checkpoint", str(tmp / "ckpt"), "--out", str(tmp / "hf"), "--lm-eval-data", str(tmp / "data")])
    assert args.fn(args) == 0
    return model, tmp / "hf"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_export_loads_offline_and_decodes_as_ours(exported, offline):
    model, out = exported
    cfg, lay = model.cfg, model.layout
    V = cfg.text_vocab_size
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    gen = GenerationConfig.from_pretrained(out, local_files_only=True)

    # the text channel: text vocabulary and its specials; our special ids in every file
    assert hf.config.vocab_size == V + cfg.num_special_tokens
    ids = {"bos": V + TextSpecial.BOS, "eos": V + TextSpecial.EOT, "pad": V + TextSpecial.PAD}
    for owner in (hf.config, gen, tok):
        assert (owner.bos_token_id, owner.eos_token_id, owner.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert gen.do_sample is False and gen.max_new_tokens == OurGenerationConfig().max_steps
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    # the tokenizer is ours: same ids, BOS added as a special token, specials dropped on decoding
    ours = ByteTokenizer()
    assert tok.encode(SAMPLE, add_special_tokens=False) == ours.encode(SAMPLE)
    assert tok(SAMPLE).input_ids == [ids["bos"], *ours.encode(SAMPLE)]
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|special_63|>"]) == [
        V + TextSpecial.USER, V + TextSpecial.ASSISTANT, V + 63]
    with_specials = [ids["bos"], *ours.encode(SAMPLE), ids["eos"]]
    assert tok.decode(with_specials, skip_special_tokens=True) == ours.decode(with_specials) == SAMPLE

    # a prompt: the chat template, the lm-eval prompt text and our user_turn give the same ids
    system, question = INSTRUCTIONS["text_qa"], "What is two plus two?"
    prompt_L = user_turn(lay, text_ids=ours.encode(question), system_ids=ours.encode(system))[:, 0].tolist()
    chat = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    templated = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert templated == text_prompt(question, system)
    assert tok.encode(templated, add_special_tokens=False) == prompt_L

    # the same logits on the text channel, and greedy generate = our greedy text decoding
    x = torch.tensor([prompt_L])
    with torch.no_grad():
        tokens = torch.full((1, len(prompt_L), lay.num_channels), lay.codec(CodecSpecial.PAD))
        tokens[..., 0] = x
        ref = model(tokens, channels=[0]).logits[0]
        assert (hf(input_ids=x).logits - ref).abs().max() < 1e-4
        steps = 16
        ours_gen = generate(model, user_turn(lay, text_ids=ours.encode(question), system_ids=ours.encode(system)),
                            cfg=OurGenerationConfig(max_steps=steps, speech=False))
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps)[0, len(prompt_L):].tolist()
    expect = ours_gen.text_ids + ([ids["eos"]] if len(ours_gen.text_ids) < steps else [])
    assert theirs == expect
    assert len(set(theirs)) > 3  # a real sequence, not one token repeated


def test_exported_directory_imports_back(exported):
    model, out = exported
    again = import_hf(out, base=model.cfg)
    assert again.cfg == model.cfg  # the specials are not mistaken for text vocabulary
    rows = model.cfg.text_vocab_size + model.cfg.num_special_tokens
    for name in ("embed.weight", "embed.head_weight"):
        assert torch.equal(dict(again.named_parameters())[name][:rows], dict(model.named_parameters())[name][:rows])
    assert torch.equal(again.layers[2].mlp.experts.gate_up_proj, model.layers[2].mlp.experts.gate_up_proj)


def test_lm_eval_task(exported, offline):
    model, out = exported
    tasks = out / "lm_eval_tasks"
    config = yaml.safe_load((tasks / "deepomni_text_qa.yaml").read_text())
    assert config["task"] == "deepomni_text_qa" and config["dataset_path"] == "json"
    assert config["output_type"] == "generate_until" and config["test_split"] == "test"
    assert (config["doc_to_text"], config["doc_to_target"]) == ("{{prompt}}", "{{answer}}")
    assert config["generation_kwargs"]["until"] == ["<|eot|>"]
    assert config["metric_list"][0]["metric"] == "exact_match"
    items = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
    assert [i["answer"] for i in items] == [a for _, a in QA]  # text_qa rows only, in order
    tok, ours = AutoTokenizer.from_pretrained(out, local_files_only=True), ByteTokenizer()
    expect = user_turn(model.layout, text_ids=ours.encode(QA[0][0]), system_ids=ours.encode(INSTRUCTIONS["text_qa"]))
    assert tok.encode(items[0]["prompt"], add_special_tokens=False) == expect[:, 0].tolist()


def test_hf_dir_tokenizer_keeps_its_ids(tmp_path):
    """``hf:<dir>``: the source tokenizer's ids unchanged, fillers up to the text vocabulary, then our specials;
    a tokenizer already holding our special names (an exported one) is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", "foo"]
    src = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    src.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=src, unk_token="[UNK]").save_pretrained(tmp_path / "src")
    tok = hf_tokenizer(f"hf:{tmp_path / 'src'}", text_vocab_size=10, num_special=64)
    text = "hello foo world bar"
    assert tok.encode(text, add_special_tokens=False) == HFTokenizer(str(tmp_path / "src")).encode(text) == [1, 3, 2, 0]
    assert tok.convert_tokens_to_ids(["<|unused_4|>", "<|pad|>", "<|eot|>"]) == [4, 10, 14]
    tok.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="already has tokens named like our specials"):
        hf_tokenizer(f"hf:{tmp_path / 'ours'}", text_vocab_size=200)
    with pytest.raises(ValueError, match="text vocabulary is 3"):
        hf_tokenizer(f"hf:{tmp_path / 'src'}", text_vocab_size=3)


def test_command_errors(tmp_path):
    p = parser()
    args = p.parse_args(["export-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="checkpoint directory .* does not exist"):
        args.fn(args)
    (tmp_path / "empty").mkdir()
    args = p.parse_args(["export-hf", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="not a DeepOmni checkpoint"):
        args.fn(args)
    args = p.parse_args(["export-hf", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="must differ from the checkpoint"):
        args.fn(args)
    (tmp_path / "empty" / "config.json").write_text(json.dumps(load_preset("tiny").to_dict()))  # no weights
    args = p.parse_args(["export-hf", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--tokenizer", "sentencepiece"])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        args.fn(args)
