"""Shared fixtures: a trained SimpleNet and the digits data set, built once per session."""

from __future__ import annotations

import pytest
import torch

import nnopt

# Test files whose results depend on the CPU's ISA: which int8 kernels are exact (oneDNN, torch._int_mm,
# ONNX Runtime) and whether bf16 is native. `make test` runs them a second time with ONEDNN_MAX_CPU_ISA=AVX2,
# where oneDNN behaves as on an AVX2-only CPU (no VNNI, no native bf16).
ISA_SENSITIVE = {
    "test_encoder_fusion.py", "test_kernel_checks.py", "test_kernel_choice.py", "test_minilm_quantization.py",
    "test_onnx_backend.py", "test_onnx_safety.py", "test_ptq.py", "test_qat.py", "test_convert_cli.py",
    "test_quantize_cli.py", "test_bench_cli.py", "test_advise_cli.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ISA_SENSITIVE:
            item.add_marker(pytest.mark.isa)


@pytest.fixture(scope="session")
def digits():
    return nnopt.load_digits()


@pytest.fixture(scope="session")
def trained_simplenet(digits):
    torch.manual_seed(0)
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=15, seed=0), progress=False)
    return model


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread, and far faster than on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (300 tokens) trained on nnopt's calibration text: small LMs' tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nnopt.llm.corpus import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([calibration_text()[:40_000]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer():
    pytest.importorskip("transformers")
    return train_tiny_bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory, tiny_bpe_tokenizer):
    """A random 2-layer Llama whose projections take 128 and 256 inputs (groups of 128 fit), with a byte-level
    BPE tokenizer, in sharded safetensors."""
    from nnopt.llm.synthetic import LlamaShape, write_synthetic_llama

    path = tmp_path_factory.mktemp("llm") / "tiny"
    shape = LlamaShape(128, 256, 2, 4, 2, len(tiny_bpe_tokenizer), max_position_embeddings=128)
    write_synthetic_llama(path, shape, seed=2, shard_bytes=300_000)
    tiny_bpe_tokenizer.save_pretrained(path)
    return path
