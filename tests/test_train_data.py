"""Training data: the three JSONL shapes, label masking, line-numbered errors, overlong handling, packing."""

import pytest
import torch

from train_fixtures import build_model, gemma4_config, llama_config, make_tokenizer, write_jsonl
from vramplan.errors import VramplanError
from vramplan.train import data


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def targets(example):
    return [label for label in example.labels if label != data.IGNORE]


def test_messages_train_on_assistant_tokens_only(tok):
    record = {"messages": [{"role": "user", "content": "what is the answer"},
                           {"role": "assistant", "content": "the answer is forty two"}]}
    ids, train = data.tokenize(record, tok)
    example = data.to_example(ids, train)
    reply = tok("the answer is forty two <|end|>", add_special_tokens=False)["input_ids"]
    assert targets(example) == reply  # not the user turn, not the <|assistant|> header inference supplies


def test_prompt_completion_and_text(tok):
    pc = data.to_example(*data.tokenize({"prompt": "what is the answer", "completion": "forty two"}, tok))
    completion = tok("forty two", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert targets(pc) == completion
    text = data.to_example(*data.tokenize({"text": "the cat sat"}, tok))
    assert targets(text) == text.input_ids[1:]  # all but the first token, shifted


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"question": "a"}', "unknown example shape"),
    ('{"messages": []}', "messages"),
    ('{"text": ""}', "text"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "the cat"}', line, '{"text": "a dog"}'])
    with pytest.raises(VramplanError, match=rf"d.jsonl:2: .*{problem}"):
        data.read_jsonl(path)


def test_blank_lines_are_passed_over_and_later_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the cat"}\n\n   \n{"text": "a dog"}\n\n')
    assert [r["text"] for r in data.read_jsonl(path)] == ["the cat", "a dog"]
    path.write_text('{"text": "the cat"}\n\n{not json\n')
    with pytest.raises(VramplanError, match=r"d.jsonl:3: not valid JSON"):
        data.read_jsonl(path)
    path.write_text("\n \n")
    with pytest.raises(VramplanError, match="has no examples"):
        data.read_jsonl(path)


def test_overlong_truncate_or_drop_is_counted(tmp_path, tok):
    long = " ".join(["the cat sat on the mat"] * 5)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": long}, {"text": "a dog"}])
    truncated = data.build_dataset(path, tok, seq_len=10, overlong="truncate")
    assert (truncated.n_truncated, truncated.n_dropped, truncated.n_examples) == (1, 0, 2)
    assert max(len(e.input_ids) for row in truncated.rows for e in row) == 10
    dropped = data.build_dataset(path, tok, seq_len=10, overlong="drop")
    assert (dropped.n_truncated, dropped.n_dropped, dropped.n_examples) == (0, 1, 1)


def test_packing_resets_positions_and_never_crosses_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in ["the cat sat", "a dog ran in the park", "we train"]])
    dataset = data.build_dataset(path, tok, seq_len=16)
    assert len(dataset.rows) == 1 and len(dataset.rows[0]) == 3
    batch = data.collate(dataset.rows, dataset.pad_token_id)
    lengths = [len(e.input_ids) for e in dataset.rows[0]]
    expected_pos = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected_pos)
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert (batch["labels"][0, ends] == data.IGNORE).all()  # an example's last token predicts nothing


@pytest.mark.parametrize("config", [llama_config, gemma4_config], ids=["llama", "gemma4"])
def test_packed_logits_equal_unpacked(tmp_path, tok, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model(config(), tmp_path / "m"), attn_implementation="sdpa").eval()
    texts = ["the cat sat on the mat", "a dog ran in the park and the quick brown fox", "we train"]
    examples = [data.to_example(*data.tokenize({"text": t}, tok)) for t in texts]
    batch = data.collate([examples], pad_token_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_bucketed_widths_are_few_and_never_shorter_or_past_the_plan():
    widths = {data.bucketed_width(w, 2048, 8) for w in range(1, 2049)}
    assert widths == {256 * k for k in range(1, 9)}
    assert all(data.bucketed_width(w, 2048, 8) >= w for w in range(1, 2049))
    assert data.bucketed_width(2100, 2048, 8) == 2100  # a row longer than the plan is never cut here
    assert data.bucketed_width(100, 1000, 8) == 125  # an uneven length: buckets of ceil(1000 / 8)


def test_a_padded_batch_trains_on_the_same_targets(tmp_path, tok):
    """The padding tail is one more position-reset stretch with no target: the summed loss of a
    tiny model is the same with and without it (so is every gradient, through the same loss)."""
    from transformers import AutoModelForCausalLM

    from vramplan.train.loss import summed_loss

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in ["the cat sat", "a dog ran in the park"]])
    dataset = data.build_dataset(path, tok, seq_len=32)
    tight = data.collate(dataset.rows, dataset.pad_token_id)
    padded = data.collate(dataset.rows, dataset.pad_token_id, width=32)
    assert padded["input_ids"].shape[1] == 32 > tight["input_ids"].shape[1]
    n = tight["input_ids"].shape[1]
    assert torch.equal(padded["position_ids"][0, n:], torch.arange(32 - n))
    assert (padded["labels"][0, n:] == data.IGNORE).all()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.for_model(**llama_config()))
    with torch.no_grad():
        (loss_tight, count_tight), (loss_padded, count_padded) = summed_loss(model, tight), summed_loss(model, padded)
    assert int(count_tight) == int(count_padded)
    torch.testing.assert_close(loss_padded, loss_tight, rtol=1e-5, atol=1e-5)


def test_with_graphs_an_epoch_of_ragged_rows_falls_on_few_shapes(tmp_path, tok):
    from vramplan.plan import Plan
    from vramplan.train import checkpoint
    from vramplan.train.recipe import next_micro_batches

    words = "one two three four five six seven eight nine ten".split()
    records = [{"text": " ".join(words[: 1 + i % 10] * (1 + i % 3))} for i in range(60)]
    dataset = data.build_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, seq_len=64)
    plan = Plan(model="tiny", seq_len=64, micro_batch=1, grad_accum=1)
    shapes = {False: set(), True: set()}
    for bucketed in (False, True):
        state = checkpoint.TrainState()
        real_tokens = 0
        for _ in range(len(dataset.rows)):
            micro, tokens = next_micro_batches(dataset, state, plan, 0, width_buckets=4 if bucketed else None)
            shapes[bucketed].add(tuple(micro[0]["input_ids"].shape))
            real_tokens += tokens
        if bucketed:
            assert real_tokens == unbucketed_tokens  # the logged tokens stay the real ones
        unbucketed_tokens = real_tokens
    assert len(shapes[True]) <= 4 < len(shapes[False])
