#!/usr/bin/env python3
"""Generate massv's Qwen2 golden fixtures with Hugging Face transformers as the reference.

Run by hand (see tests/reference/README.md):

    ~/.cache/massv-fixtures-venv/bin/python tests/reference/make_qwen2_fixtures.py

Everything is seeded, so re-running rewrites byte-identical files on the same versions.
Outputs, all under tests/fixtures/:

  tokenizer/                       tiny byte-level BPE built exactly like Qwen2's (422 ids)
  qwen2-tiny-*/                    tiny random Qwen2ForCausalLM checkpoints (+ expected.*)
  tokenizer_cases/qwen2_ids.json   real Qwen2 vocabulary: text -> ids -> decoded text
  tokenizer_cases/tiny_ids.json    the same strings through the tiny tokenizer
  tokenizer_cases/chat_template_cases.json   real chat templates rendered by transformers
"""

import json
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

# Paths are relative to this file so the script works from any working directory.
REPO = Path(__file__).resolve().parents[2]
REAL = REPO.parent / "shared" / "real-models"
FIXTURES = REPO / "tests" / "fixtures"
TINY_TOK_DIR = FIXTURES / "tokenizer"
CASES_DIR = FIXTURES / "tokenizer_cases"

REAL_VOCAB = REAL / "qwen2-tokenizer" / "vocab.json"
REAL_MERGES = REAL / "qwen2-tokenizer" / "merges.txt"
QWEN05_TOKCFG = "Qwen2.5-0.5B-Instruct/tokenizer_config.json"
VL_TOKCFG = "Qwen2.5-VL-7B-Instruct/tokenizer_config.json"
VL_TEMPLATE = "Qwen2.5-VL-7B-Instruct/chat_template.json"

# The Qwen2 pre-tokenizer split pattern, verbatim from the real tokenizer.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2's added tokens in id order, with the "special" flag of the real tokenizer_config
# (the first 14 are special, the tool/FIM ones are plain added tokens).
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
REAL_FIRST_ADDED_ID = 151643

TINY_BPE_SIZE = 400  # ids 0..399: 256 byte symbols + 144 merges
TINY_ENDOFTEXT = TINY_BPE_SIZE  # 400
TINY_IM_END = TINY_BPE_SIZE + 2  # 402
MODEL_VOCAB = 448  # > 422 tokenizer ids: the extra rows are padding, as in real Qwen (151936 > 151665)
TINY_MODEL_MAX_LEN = 4096

# Training text for the tiny BPE. It deliberately repeats the words of the chat prompt
# ("system", "user", "assistant", "Hello there, how are you?") so that the fixture prompt
# exercises real merges rather than falling back to single bytes.
CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
Hello there, how are you? I am fine, thank you. How are you today? Hello again!
The system message tells the assistant how to behave. The user message follows it,
and then the assistant writes a reply. Every reply should be clear, short and honest.

On Monday the weather was cold and grey, but by Friday the sun came out again.
People walked along the river, talked with their friends, and watched the boats
move slowly under the old stone bridge. It's a quiet town, and they'll say it's the
best place they've ever lived; I'd agree, and we're not the only ones who've stayed.

A small program reads numbers from a file, adds them together and prints the total.
If the file is empty, the program prints zero. If a line can't be read, it stops
and reports the line number. Tests check each of these cases before every release.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2025 3.14159 2.71828 1,000,000 50%
Punctuation: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
Code:
fn main() {
    let total = 1 + 2;
    if total > 2 {
        println!("{}", total);
    }
}
"""

# Strings for the tokenizer goldens; each one targets a different part of the pipeline.
TOKENIZER_CASES = [
    "Hello world!",
    "你好，世界！今天天气很好。",  # CJK, full-width punctuation
    "こんにちは、世界。東京は晴れです。",  # Japanese kana + kanji
    "1234567890 and 3.14159",  # \p{N} splits digits one by one
    "a   b\n\n\tc  \n   d",  # \s+(?!\S) and \s*[\r\n]+ branches
    "   leading and trailing   ",
    "line one\r\nline two\r\n",  # CRLF line endings
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # special tokens inside text
    "<|vision_start|><|image_pad|><|vision_end|>Describe.",
    "<tool_call>{\"name\": \"f\"}</tool_call>",  # non-special added tokens
    "I'm sure they'll say it's fine, don't you think?",  # contraction branch
    "YOU'RE RIGHT, IT'S FINE",  # the contraction branch is case-insensitive
    'fn main() {\n    println!("hi");\n}',
    "🙂👍🏽 ok",  # 4-byte UTF-8 and a skin-tone modifier
    "Cafe\u0301 de\u0301ja\u0300 vu",  # decomposed accents: NFC must compose them first
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "HELLO Hello hello",
    "col1\tcol2\t\tcol3",
    "",
]

PROMPT_MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
DECODE_STEPS = 12

# Tiny models: each covers a different attention layout / weight layout of real Qwen2 checkpoints.
MODELS = [
    {
        "name": "qwen2-tiny-gqa4-tied",
        "seed": 1,
        "config": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, tie_word_embeddings=True, rope_theta=10000.0),
        "max_shard_size": None,
    },
    {
        "name": "qwen2-tiny-mha-untied",
        "seed": 2,
        "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1000000.0),
        "max_shard_size": None,
    },
    {
        "name": "qwen2-tiny-gqa2-sharded",
        "seed": 3,
        "config": dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1000000.0),
        # Small shards force the index.json + model-0000X-of-0000N layout of real checkpoints.
        "max_shard_size": "200KB",
    },
]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def fresh_dir(path: Path) -> Path:
    """Empty a fixture directory so stale files (e.g. old shards) never survive a re-run."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------
# 1. Tiny tokenizer
# ---------------------------------------------------------------------------------------------

def qwen2_style_tokenizer_config(first_added_id: int, model_max_length: int) -> dict:
    """The real Qwen2.5-VL tokenizer_config.json, re-pointed at our ids.

    Starting from the real file keeps every Qwen2 key (errors, split_special_tokens, ...)
    and the exact added-token flags; only the ids, the length limit and the template change.
    """
    cfg = json.loads((REAL / VL_TOKCFG).read_text(encoding="utf-8"))
    real_added = sorted(cfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
    assert [(v["content"], v["special"]) for _, v in real_added] == ADDED_TOKENS
    cfg["added_tokens_decoder"] = {
        str(first_added_id + i): entry for i, (_, entry) in enumerate(real_added)
    }
    # chat_template.json is where transformers >= 4.43 reads the VL template from; it is the
    # same string as the one inside tokenizer_config.json, which we assert.
    template = json.loads((REAL / VL_TEMPLATE).read_text(encoding="utf-8"))["chat_template"]
    assert template == cfg["chat_template"]
    cfg["chat_template"] = template
    cfg["model_max_length"] = model_max_length
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] is None and cfg["tokenizer_class"] == "Qwen2Tokenizer"
    return cfg


def build_tiny_tokenizer() -> Tokenizer:
    # Same component graph as Qwen2's tokenizer.json, so the Rust loader sees the real layout.
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # The ByteLevel decoder has no options that affect decoding (its constructor ignores them).
    tok.decoder = decoders.ByteLevel()

    # The full 256-symbol byte alphabet is seeded so every byte is encodable, as in Qwen2
    # (the trainer then orders it by code point, which is GPT-2's byte order: "!" = 0).
    # Training replaces the model with one built from the trainer's settings, so the empty
    # subword prefix/suffix that Qwen2's tokenizer.json spells out must be given here.
    trainer = BpeTrainer(vocab_size=TINY_BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         special_tokens=[], continuing_subword_prefix="", end_of_word_suffix="",
                         show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    assert tok.get_vocab_size(with_added_tokens=False) == TINY_BPE_SIZE

    # Added one at a time so ids follow the Qwen2 order exactly (400..421).
    for i, (content, special) in enumerate(ADDED_TOKENS):
        token = AddedToken(content, special=special, normalized=False)
        added = tok.add_special_tokens([token]) if special else tok.add_tokens([token])
        assert added == 1 and tok.token_to_id(content) == TINY_BPE_SIZE + i
    return tok


def write_tiny_tokenizer() -> Tokenizer:
    fresh_dir(TINY_TOK_DIR)
    tok = build_tiny_tokenizer()
    tok.save(str(TINY_TOK_DIR / "tokenizer.json"), pretty=True)
    write_json(TINY_TOK_DIR / "tokenizer_config.json",
               qwen2_style_tokenizer_config(TINY_BPE_SIZE, TINY_MODEL_MAX_LEN))
    # Reload from disk: the fixture is what the Rust side reads, not the in-memory object.
    return Tokenizer.from_file(str(TINY_TOK_DIR / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# 4. Tokenizer goldens (real Qwen2 vocabulary and the tiny one)
# ---------------------------------------------------------------------------------------------

def load_fast_and_slow(vocab: Path, merges: Path, tokenizer_config: dict):
    """Load a Qwen2 tokenizer from vocab.json + merges.txt both ways.

    Without a tokenizer.json, transformers builds the fast (Rust `tokenizers`) tokenizer by
    converting the slow one; the slow Qwen2Tokenizer is an independent pure-Python BPE, so the
    two agreeing is a real cross-check of the goldens.
    """
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(vocab, Path(tmp) / "vocab.json")
        shutil.copy(merges, Path(tmp) / "merges.txt")
        write_json(Path(tmp) / "tokenizer_config.json", tokenizer_config)
        fast = AutoTokenizer.from_pretrained(tmp, use_fast=True)
        slow = AutoTokenizer.from_pretrained(tmp, use_fast=False)
    assert type(fast).__name__ == "Qwen2TokenizerFast" and type(slow).__name__ == "Qwen2Tokenizer"
    return fast, slow


def cross_checked_cases(fast, slow, reference_encode, reference_decode) -> list:
    cases = []
    for text in TOKENIZER_CASES:
        ids = reference_encode(text)
        decoded = reference_decode(ids)
        for hf in (fast, slow):
            assert hf.encode(text, add_special_tokens=False) == ids, (type(hf).__name__, text)
            assert hf.decode(ids, skip_special_tokens=False) == decoded, (type(hf).__name__, text)
        cases.append({"text": text, "ids": ids, "decoded": decoded})
    return cases


def write_real_tokenizer_cases():
    real_cfg = json.loads((REAL / QWEN05_TOKCFG).read_text(encoding="utf-8"))
    fast, slow = load_fast_and_slow(REAL_VOCAB, REAL_MERGES, real_cfg)
    assert len(fast) == REAL_FIRST_ADDED_ID + len(ADDED_TOKENS)
    # Known value from shared/real-models/README.md.
    assert fast.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]
    cases = cross_checked_cases(
        fast, slow,
        lambda t: fast.encode(t, add_special_tokens=False),
        lambda ids: fast.decode(ids, skip_special_tokens=False),
    )
    write_json(CASES_DIR / "qwen2_ids.json", cases)
    return fast


def write_tiny_tokenizer_cases(tiny: Tokenizer):
    # The slow tokenizer needs vocab.json + merges.txt; the BPE model can write exactly those.
    with tempfile.TemporaryDirectory() as tmp:
        tiny.model.save(tmp)
        cfg = json.loads((TINY_TOK_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
        fast, slow = load_fast_and_slow(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt", cfg)
    cases = cross_checked_cases(
        fast, slow,
        lambda t: tiny.encode(t).ids,
        lambda ids: tiny.decode(ids, skip_special_tokens=False),
    )
    write_json(CASES_DIR / "tiny_ids.json", cases)


# ---------------------------------------------------------------------------------------------
# 5. Chat template goldens
# ---------------------------------------------------------------------------------------------

def write_chat_template_cases(real_tok):
    templates = {
        VL_TEMPLATE: json.loads((REAL / VL_TEMPLATE).read_text(encoding="utf-8"))["chat_template"],
        QWEN05_TOKCFG: json.loads((REAL / QWEN05_TOKCFG).read_text(encoding="utf-8"))["chat_template"],
    }
    image = {"type": "image"}
    cases = [
        (VL_TEMPLATE, [{"role": "user", "content": [image, {"type": "text", "text": "Describe this image."}]}],
         True),
        (VL_TEMPLATE, [{"role": "user", "content": [{"type": "text", "text": "Look:"}, image,
                                                    {"type": "text", "text": "What colour is it?"}]}],
         True),
        (VL_TEMPLATE, [{"role": "system", "content": "You are a terse assistant."},
                       {"role": "user", "content": "What is 2+2?"},
                       {"role": "assistant", "content": "4."},
                       {"role": "user", "content": "And 3+3?"}],
         True),
        (VL_TEMPLATE, [{"role": "user", "content": [image, {"type": "text", "text": "Describe this image."}]},
                       {"role": "assistant", "content": "A red bicycle against a wall."}],
         False),
        (QWEN05_TOKCFG, [{"role": "user", "content": "Hello there, how are you?"}], True),
        (QWEN05_TOKCFG, [{"role": "system", "content": "You are a pirate."},
                         {"role": "user", "content": "Where is the treasure?"}],
         True),
        (QWEN05_TOKCFG, [{"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello! How can I help?"}],
         False),
    ]
    out = []
    for template_file, messages, add_generation_prompt in cases:
        rendered = real_tok.apply_chat_template(
            messages, chat_template=templates[template_file], tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        out.append({"template_file": template_file, "messages": messages,
                    "add_generation_prompt": add_generation_prompt, "rendered": rendered})
    write_json(CASES_DIR / "chat_template_cases.json", out)


# ---------------------------------------------------------------------------------------------
# 2./3. Tiny models and their expected outputs
# ---------------------------------------------------------------------------------------------

def randomize_(model: Qwen2ForCausalLM) -> None:
    """Make every parameter matter and the logits peaked.

    The default init (std 0.02, zero biases, unit norms) gives near-flat logits, where a
    greedy argmax is decided by rounding noise, and would leave the q/k/v biases and the
    RMSNorm weights untested. Std 0.2 gives logits with std around 2 (printed and checked).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:  # embeddings, all Linear weights and the q/k/v biases
                p.normal_(0.0, 0.2)


def save_model(spec: dict, model_dir: Path) -> None:
    config = Qwen2Config(
        vocab_size=MODEL_VOCAB,
        max_position_embeddings=TINY_MODEL_MAX_LEN,
        rms_norm_eps=1e-6,
        # Like the real checkpoints: bos/eos in config.json, no pad_token_id (a config pad id
        # would make nn.Embedding zero that row).
        bos_token_id=TINY_ENDOFTEXT,
        eos_token_id=TINY_IM_END,
        dtype="float32",
        attn_implementation="eager",
        initializer_range=0.2,  # documents randomize_()'s std; the default init is overwritten
        **spec["config"],
    )
    torch.manual_seed(spec["seed"])
    model = Qwen2ForCausalLM(config)
    randomize_(model)
    kwargs = {"max_shard_size": spec["max_shard_size"]} if spec["max_shard_size"] else {}
    model.save_pretrained(model_dir, safe_serialization=True, **kwargs)

    # Only the ids: the real generation_config.json also carries sampling settings
    # (repetition_penalty, top_p, ...), which would change the greedy reference.
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=TINY_ENDOFTEXT, eos_token_id=[TINY_IM_END, TINY_ENDOFTEXT], pad_token_id=TINY_ENDOFTEXT,
    )
    model.generation_config.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOK_DIR / name, model_dir / name)


def write_expected(model_dir: Path) -> dict:
    # Reload from disk so the goldens come from exactly the files the Rust side will load
    # (this also exercises transformers' own sharded loading).
    model = Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    prompt_text = tok.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True)
    input_ids = tok.apply_chat_template(PROMPT_MESSAGES, tokenize=True, add_generation_prompt=True)
    assert input_ids == tok.encode(prompt_text, add_special_tokens=False)
    ids = torch.tensor(input_ids, dtype=torch.int64)

    with torch.no_grad():
        prefill_logits = model(ids[None]).logits[0].float()
        # eos_token_id=None turns off stopping without min_new_tokens, whose EOS masking would
        # make a token differ from the argmax of the raw logits we store.
        gen = model.generate(
            ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
            max_new_tokens=DECODE_STEPS, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )
    decode_tokens = gen.sequences[0, len(input_ids):]
    decode_logits = torch.cat(gen.logits, dim=0).float()

    # Invariants the Rust tests rely on.
    assert decode_tokens.shape == (DECODE_STEPS,) and decode_logits.shape == (DECODE_STEPS, MODEL_VOCAB)
    assert torch.equal(decode_logits.argmax(-1), decode_tokens), "greedy token != argmax of stored logits"
    assert torch.allclose(decode_logits[0], prefill_logits[-1], atol=1e-5)
    with torch.no_grad():  # KV-cached decode must match a from-scratch forward of the same text
        full = model(gen.sequences[:, :-1]).logits[0, len(input_ids) - 1:]
    assert torch.allclose(full, decode_logits, atol=1e-4), (full - decode_logits).abs().max()

    logits_std = prefill_logits.std().item()
    assert logits_std > 1.0, logits_std
    # A near-tie between the best two logits would let float reordering in another runtime flip
    # a greedy token; 1e-3 is ~10x the f32 logit error expected from these tiny models.
    top2 = decode_logits.topk(2, dim=-1).values
    min_greedy_margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert min_greedy_margin > 1e-3, min_greedy_margin
    safetensors.torch.save_file(
        {
            "prefill.input_ids": ids.contiguous(),
            "prefill.logits": prefill_logits.contiguous(),
            "decode.tokens": decode_tokens.to(torch.int64).contiguous(),
            "decode.logits": decode_logits.contiguous(),
        },
        model_dir / "expected.safetensors",
    )
    write_json(model_dir / "expected.json", {
        "prompt_text": prompt_text,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "logits_std": logits_std,
        "min_greedy_margin": min_greedy_margin,
    })
    return {"S": len(input_ids), "logits_std": logits_std, "margin": min_greedy_margin,
            "decode": decode_tokens.tolist()}


def main() -> None:
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, torch {torch.__version__}")

    tiny = write_tiny_tokenizer()
    write_tiny_tokenizer_cases(tiny)
    real_tok = write_real_tokenizer_cases()
    write_chat_template_cases(real_tok)
    print(f"tokenizer fixtures: {TINY_TOK_DIR.relative_to(REPO)}, {CASES_DIR.relative_to(REPO)}")

    for spec in MODELS:
        model_dir = fresh_dir(FIXTURES / spec["name"])
        save_model(spec, model_dir)
        info = write_expected(model_dir)
        print(f"{spec['name']}: S={info['S']} prefill logits std={info['logits_std']:.3f} "
              f"min greedy margin={info['margin']:.4f} greedy={info['decode']}")


if __name__ == "__main__":
    main()
