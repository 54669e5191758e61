"""Tests for make_bases.py and the bases it shipped: both loaders (ours and transformers') read them and agree, the
tokenizer fits the world and data.py, the bases know the world, and a tiny run of the whole script works."""
import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

import data
import flags
import make_bases
import world
from clip import CLIP, CLIPVision
from llama import Llama
from data import question_ids
from tinyllava import IMAGE_TOKEN_INDEX

BASES = Path(__file__).resolve().parents[1] / "bases"
CLIP_DIR, LLAMA_DIR = BASES / "clip", BASES / "llama"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>"]  # ids 0..4, as the brief fixes them
TINY = ["--n_train", "24", "--n_heldout", "8", "--clip_steps", "2", "--llm_steps", "2", "--clip_batch", "8",
        "--llm_batch", "4", "--vision_width", "16", "--vision_heads", "2", "--text_width", "16", "--text_heads", "2",
        "--llm_width", "16", "--llm_heads", "2", "--llm_kv_heads", "1", "--llm_intermediate", "24",
        "--color_steps", "1", "--position_steps", "1", "--facts_steps", "1"]


@pytest.fixture(scope="module")
def unseen_world(tmp_path_factory):
    """A world of another seed: scenes and sentences the bases never trained on, in the same language."""
    return world.ensure_world(tmp_path_factory.mktemp("world"), seed=1, n_train=300, n_heldout=60, eval_per_type=10)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(LLAMA_DIR / "tokenizer.json"))


def records(directory, *names):
    return [r for name in names for r in json.loads((directory / name).read_text())]

# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer


def test_tokenizer_has_the_fixed_special_ids_adds_nothing_and_is_the_same_file_in_both_bases(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(5)] == SPECIAL
    assert (CLIP_DIR / "tokenizer.json").read_bytes() == (LLAMA_DIR / "tokenizer.json").read_bytes()
    assert tokenizer.post_processor is None
    assert tokenizer.encode("A red circle.").ids == tokenizer.encode("A red circle.", add_special_tokens=False).ids
    assert 256 < tokenizer.get_vocab_size() <= 1024


def test_every_word_of_an_unseen_world_is_one_token_and_its_text_round_trips(tokenizer, unseen_world):
    texts = make_bases.world_texts(unseen_world)
    texts += [t for item in records(unseen_world, "eval.json") for t in (item["question"], " " + item["answer"])]
    assert len(texts) > 1000
    for text in texts:
        words = tokenizer.pre_tokenizer.pre_tokenize_str(text)  # GPT-2's split: ' circle', '.', '\n', "'s", ...
        assert len(tokenizer.encode(text).ids) == len(words), f"a word of {text!r} takes several tokens"
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.decode(tokenizer.encode(" a zebra in Zürich, 42 km!").ids) == " a zebra in Zürich, 42 km!"


def test_data_py_encodes_conversations_the_tokenizer_decodes_back_exactly(tokenizer, unseen_world):
    for record in records(unseen_world, "val_stage1.json", "val_stage2.json")[:200]:
        for image_first in (True, False):
            ids, _ = data.encode_conversation(record["conversations"], tokenizer, "vicuna_v1", image_first)
            assert ids[0] == 1 and ids.count(1) == 1 and ids.count(IMAGE_TOKEN_INDEX) == ("image" in record)
            text = tokenizer.decode([i for i in ids if i != IMAGE_TOKEN_INDEX], skip_special_tokens=False)
            expected = data.render_conversation(record["conversations"], "vicuna_v1", image_first)
            assert text == "<s>" + expected.replace("<image>", "")
    assert data.stop_token_ids(tokenizer, "vicuna_v1") == [2]
    assert tokenizer.decode([data.stop_token_ids(tokenizer, "plain")[0]]) == "\n"


def test_transformers_auto_tokenizer_reads_the_special_tokens():
    for directory, eos in ((LLAMA_DIR, 2), (CLIP_DIR, 4)):
        hf = transformers.AutoTokenizer.from_pretrained(str(directory))
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, eos, 3, 0)

# ----------------------------------------------------------------------------------------------------------------------
# The shipped checkpoints: configs, both loaders, parity with transformers


def test_clip_text_tower_pools_at_end_of_text_id_4_never_the_legacy_eos_2(tokenizer):
    # transformers (and clip.py) read eos_token_id == 2 as a pre-2023 config and pool at argmax(input_ids) instead
    text_config = json.loads((CLIP_DIR / "config.json").read_text())["text_config"]
    assert (text_config["bos_token_id"], text_config["eos_token_id"], text_config["pad_token_id"]) == (1, 4, 3)
    hf = transformers.CLIPModel.from_pretrained(str(CLIP_DIR), dtype=torch.float32).text_model.eval()
    ids = make_bases.clip_ids(["A small red circle on a white background.", "A large blue square."], tokenizer, 64)
    with torch.no_grad():
        out = hf(input_ids=ids)
    end = (ids == 4).int().argmax(1)
    assert end[1] < ids.shape[1] - 1 and ids[1, -1] == 3  # the shorter text is padded after its end of text
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), end])


def test_llama_config_has_bos_1_eos_2_pad_3_and_tied_embeddings():
    config = json.loads((LLAMA_DIR / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert config["tie_word_embeddings"] and config["model_type"] == "llama"


def world_batch(directory, tokenizer, count=6):
    scenes = records(directory, "scenes.json")[-count:]
    pixels = torch.stack([data.process_image(data.load_image(directory / s["image"]), world.IMAGE_SIZE)
                          for s in scenes])
    return pixels, make_bases.clip_ids([s["caption"] for s in scenes], tokenizer, 64)


def test_shipped_clip_loads_in_our_loaders_and_transformers_with_equal_logits_and_features(tokenizer, unseen_world):
    pixels, ids = world_batch(unseen_world, tokenizer)
    ours = CLIP.from_pretrained(str(CLIP_DIR))
    theirs = transformers.CLIPModel.from_pretrained(str(CLIP_DIR), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(ours(pixels, ids), expected.logits_per_image, atol=1e-4, rtol=1e-4)
        vision = CLIPVision.from_pretrained(str(CLIP_DIR))
        torch.testing.assert_close(vision(pixels, layer=-2), expected.vision_model_output.hidden_states[-2],
                                   atol=1e-5, rtol=1e-5)
    assert vision.config.num_patches == 9  # one token per cell of the world's 3 x 3 grid


def test_shipped_llama_loads_in_our_loader_and_transformers_with_equal_logits(tokenizer, unseen_world):
    conversation = records(unseen_world, "val_stage2.json")[0]["conversations"]
    ids, _ = data.encode_conversation(conversation, tokenizer, "vicuna_v1", image_first=True)
    ids = torch.tensor([[i for i in ids if i != IMAGE_TOKEN_INDEX]])
    ours = Llama.from_pretrained(str(LLAMA_DIR))
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(LLAMA_DIR), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_preprocessor_config_gives_the_pixels_the_clip_was_trained_on(unseen_world):
    image = data.load_image(unseen_world / "images" / "val_00000.png")
    processor = transformers.CLIPImageProcessor.from_pretrained(str(CLIP_DIR))
    hf_pixels = torch.tensor(processor(images=image, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(hf_pixels, data.process_image(image, world.IMAGE_SIZE), atol=1e-5, rtol=0)
    settings = data.image_settings(str(CLIP_DIR))
    assert settings == dict(size=world.IMAGE_SIZE, mean=data.CLIP_MEAN, std=data.CLIP_STD)


def test_shipped_bases_are_stored_in_float16_and_small_enough_for_git():
    from safetensors import safe_open
    for directory in (CLIP_DIR, LLAMA_DIR):
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert sum(p.stat().st_size for p in BASES.rglob("*") if p.is_file()) < 11e6

# ----------------------------------------------------------------------------------------------------------------------
# The shipped bases know the world (scenes they never saw)


def test_shipped_clip_retrieves_unseen_scenes_and_each_cell_token_says_what_its_cell_holds(tokenizer, unseen_world):
    scenes_json = records(unseen_world, "scenes.json")
    scenes = [world.scene_from_json(r) for r in scenes_json]
    pixels = torch.stack([data.process_image(data.load_image(unseen_world / r["image"]), world.IMAGE_SIZE)
                          for r in scenes_json])
    is_train = torch.tensor([r["split"] == "train" for r in scenes_json])
    figures = make_bases.clip_quality(CLIP.from_pretrained(str(CLIP_DIR)), tokenizer, scenes, pixels, is_train,
                                      make_bases.Settings())
    assert figures["retrieval"] >= 0.9  # 60 held-out pairs; about 0.98 measured among 256
    for name in ("occupied", "shape", "color", "size", "cell"):  # 1.000 measured with the full world
        assert figures[f"{name} own"] >= 0.95, (name, figures)


def test_shipped_llama_answers_unseen_scenes_written_in_words_in_world_phrasing(tokenizer, unseen_world):
    """What stage 1 builds on: the LLaMA reads a scene whose 9 cells are each the mean of its words' embeddings and
    answers sample.py --eval's questions, exact match, greedy (10 per type of a world it never saw)."""
    model = Llama.from_pretrained(str(LLAMA_DIR))
    figures = make_bases.reading_accuracy(model, tokenizer, unseen_world, make_bases.Settings())
    assert figures["overall"] >= 0.9 and min(figures.values()) >= 0.7, figures  # 0.986 measured on the full world


# ----------------------------------------------------------------------------------------------------------------------
# The script itself, at a tiny size


def test_cell_sentence_is_the_detailed_description_sentence_and_pooling_is_one_patch_per_cell():
    objects = (world.place("circle", "red", "large", 0, 0), world.place("square", "blue", "small", 1, 2))
    scene = world.Scene("gray", objects)
    sentences = [make_bases.cell_sentence(o, o.row, o.col) for o in scene.objects]
    assert world.description(scene).endswith(" " + " ".join(sentences))
    assert sentences == ["A large red circle is in the top left corner.", "A small blue square is on the right."]
    config = make_bases.CLIPVisionConfig(image_size=world.IMAGE_SIZE, patch_size=make_bases.Settings().patch_size)
    torch.testing.assert_close(make_bases.cell_pooling(config), torch.eye(9))


# ----------------------------------------------------------------------------------------------------------------------
# Reading a scene written in words


def scene_with_tokens():
    scene = world.Scene("light blue", (world.place("circle", "red", "large", 0, 0),
                                       world.place("square", "blue", "small", 1, 2)))
    tokenizer = make_bases.train_tokenizer(["What color is the large circle? The large circle is red.",
                                            "Is there a red circle in the image? Yes, there is a red circle.",
                                            world.caption(scene) + "\n",  # and every other word a cell can hold:
                                            "top left top right bottom center white gray green yellow purple orange "
                                            "triangle"])
    return scene, tokenizer


def test_each_cell_is_spliced_in_as_the_mean_of_its_word_embeddings_where_the_image_stands():
    scene, tokenizer = scene_with_tokens()
    config = make_bases.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=8, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    model = Llama(config)
    ids, _, _ = make_bases.reading_example({"color": 1}, scene, tokenizer, set(), random.Random(0), budget=1,
                                          image_first=False)
    assert ids.count(IMAGE_TOKEN_INDEX) == 9
    cells = torch.tensor([make_bases.cell_ids(scene, tokenizer)])  # (1, 9, 6)
    embeds = make_bases.scene_embeddings(model, torch.tensor([ids]), cells)[0]
    table = model.embed_tokens.weight
    words = lambda *words: [table[tokenizer.encode(word).ids].squeeze(0) for word in words]  # each one token
    first = ids.index(IMAGE_TOKEN_INDEX)  # the question comes first: the text before, the 9 cells, nothing after
    torch.testing.assert_close(embeds[first], sum(words(" top", " left", "<|light blue|>", " large", " red",
                                                        " circle")) / 6)
    torch.testing.assert_close(embeds[first + 1], sum(words(" top", "<|light blue|>", "<|empty|>")) / 3)
    torch.testing.assert_close(embeds[first + 5], sum(words(" right", "<|light blue|>", " small", " blue",
                                                            " square")) / 5)
    torch.testing.assert_close(embeds[:first], table[ids[:first]])
    torch.testing.assert_close(embeds[first + 9:], table[ids[first + 9:]])


def test_cell_noise_blurs_only_the_cells_each_row_by_a_share_of_their_norm_drawn_up_to_the_setting():
    scene, tokenizer = scene_with_tokens()
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(tokenizer.get_vocab_size(), 2048)  # wide: a row's noise norm is sharp
    ids, _, _ = make_bases.reading_example({"color": 1}, scene, tokenizer, set(), random.Random(0), budget=1)
    ids, cells = torch.tensor([ids] * 400), torch.tensor([make_bases.cell_ids(scene, tokenizer)] * 400)
    exact = make_bases.scene_embeddings(model, ids, cells)
    torch.manual_seed(0)
    blurred = make_bases.scene_embeddings(model, ids, cells, noise=0.5)
    image = ids[0] == IMAGE_TOKEN_INDEX
    torch.testing.assert_close(blurred[:, ~image], exact[:, ~image])  # the text is never touched
    shares = ((blurred - exact)[:, image].norm(dim=-1) / exact[:, image].norm(dim=-1))  # (rows, 9)
    assert (shares.std(1) < 0.02).all()  # one share per row (its cells alike), ...
    row_shares = shares.mean(1)  # ... uniform in [0, 0.5] over the rows
    assert 0.48 < row_shares.max() < 0.51 and row_shares.min() < 0.01 and abs(row_shares.mean().item() - 0.25) < 0.02


def test_only_the_fact_words_an_answer_adds_to_its_question_are_weighted_in_the_fact_phases():
    scene, tokenizer = scene_with_tokens()
    facts = make_bases.fact_ids(tokenizer)
    for seed in range(20):  # 'What color is the large circle?' (or 'the circle'): only 'red' is a new fact
        ids, labels, fact = make_bases.reading_example({"color": 1}, scene, tokenizer, facts, random.Random(seed),
                                                       budget=1)
        if "circle" in tokenizer.decode([i for i in ids if i >= 0]):
            break
    assert tokenizer.decode([label for label, is_fact in zip(labels, fact) if is_fact]) == " red"
    answer = tokenizer.decode([label for label in labels if label >= 0], skip_special_tokens=True)
    assert answer.strip().endswith("circle is red.")
    ids, labels, fact = make_bases.reading_example({"caption": 1}, scene, tokenizer, facts, random.Random(0), budget=1)
    assert ids[:10] == [1] + [IMAGE_TOKEN_INDEX] * 9  # stage 1's plain template: <s>, the image, the caption
    assert tokenizer.decode([label for label, is_fact in zip(labels, fact) if is_fact]).split() == \
        ["large", "red", "circle", "top", "left", "small", "blue", "square", "right", "light", "blue"]


def test_each_answer_of_a_conversation_weights_only_the_facts_its_own_question_does_not_give():
    scene, tokenizer = scene_with_tokens()
    turns = [("What color is the large circle?", "The large circle is red."),
             ("Is there a red circle in the image?", "Yes, there is a red circle.")]
    ids, labels, fact = make_bases.reading_conversation(turns, tokenizer, make_bases.fact_ids(tokenizer), True)
    assert ids.count(IMAGE_TOKEN_INDEX) == 9 and ids.index(IMAGE_TOKEN_INDEX) < ids.index(tokenizer.token_to_id("What"))
    assert tokenizer.decode([label for label, is_fact in zip(labels, fact) if is_fact]).split() == ["red", "Yes"]


def test_a_sequence_packs_distinct_questions_about_its_scene_up_to_the_token_budget():
    scene, tokenizer = scene_with_tokens()
    mix = {"color": 1, "shape": 1, "count": 1, "existence": 1}
    for budget in (1, 300, 600):
        ids, labels, _ = make_bases.reading_example(mix, scene, tokenizer, set(), random.Random(budget), budget)
        questions = [turn.split(" ASSISTANT:")[0] for turn in tokenizer.decode([i for i in ids if i >= 0]).split(
            "USER: ")[1:]]
        assert len(set(questions)) == len(questions) >= (1 if budget == 1 else 3)
        assert len(ids) <= budget or len(questions) == 1
        assert labels.count(2) == len(questions)  # each answer ends with its EOS


def test_the_text_form_eval_asks_exactly_what_sample_eval_asks_with_the_scene_in_words(tmp_path, tokenizer):
    """reading_accuracy's prompt is evaluate.py's (data.question_ids) with the image placeholder widened to the 9
    cells."""
    question = "What color is the square?"
    expected = question_ids(question, tokenizer, "vicuna_v1")
    at = expected.index(IMAGE_TOKEN_INDEX)
    widened = expected[:at] + [IMAGE_TOKEN_INDEX] * 9 + expected[at + 1:]
    assert make_bases.reading_prompt(question, tokenizer) == widened


def test_tiny_run_writes_bases_both_loaders_read_deterministically_from_the_seed(tmp_path, capsys):
    for out in ("a", "b"):
        make_bases.main(TINY + ["--llm_eval_every", "2", "--out", str(tmp_path / out),
                                "--world_root", str(tmp_path / "world")])
    printed = capsys.readouterr().out
    for what in ("fact words right \\(teacher-forced\\)", "exact match"):  # progress
        assert re.search(rf"llama step 4: held-out {what} color \d\.\d{{3}}, .*overall", printed)
    assert "clip step 2/2" in printed and "eta" in printed and "total" in printed
    assert "llama phase 4 from step 4: color, shape," in printed and "llama step 5/5" in printed
    assert re.search(r"LLaMA, held-out scenes written in words, exact match: color \d\.\d{3}, .*overall", printed)
    written = Tokenizer.from_file(str(tmp_path / "a" / "llama" / "tokenizer.json"))
    assert [written.token_to_id(token) for token in make_bases.SCENE_TOKENS] == \
        list(range(written.get_vocab_size() - len(world.SCENE_TOKENS), written.get_vocab_size()))
    for name in ("clip", "llama"):
        files = sorted(p.name for p in (tmp_path / "a" / name).iterdir())
        assert files == sorted(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
                               + (["preprocessor_config.json"] if name == "clip" else []))
        for file in files:
            assert (tmp_path / "a" / name / file).read_bytes() == (tmp_path / "b" / name / file).read_bytes(), file
    assert not (tmp_path / "a" / "build").exists()
    CLIP.from_pretrained(str(tmp_path / "a" / "clip"))
    Llama.from_pretrained(str(tmp_path / "a" / "llama"))
    transformers.CLIPModel.from_pretrained(str(tmp_path / "a" / "clip"))
    transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "a" / "llama"))
    assert json.loads((tmp_path / "a" / "clip" / "config.json").read_text())["text_config"]["eos_token_id"] == 4


def test_an_interrupted_llama_training_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    tiny = TINY + ["--llm_steps", "6", "--checkpoint_every", "2", "--llm_eval_every", "0",
                   "--world_root", str(tmp_path / "world")]
    monkeypatch.setattr(make_bases, "reading_accuracy", lambda *args: {"overall": 0.0})  # speed: no final eval
    make_bases.main(tiny + ["--out", str(tmp_path / "whole")])
    calls, reading_loss = [], make_bases.reading_loss

    def interrupted(*args, **kwargs):  # Ctrl-C during the 8th step, after the checkpoint of step 6
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return reading_loss(*args, **kwargs)
    monkeypatch.setattr(make_bases, "reading_loss", interrupted)
    with pytest.raises(SystemExit, match="130"):
        make_bases.main(tiny + ["--out", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "build" / "llama_training.pt").exists() and not (tmp_path / "cut" / "llama").exists()
    assert "stopped; the same command with --resume goes on from the last checkpoint in" in capsys.readouterr().err
    monkeypatch.setattr(make_bases, "reading_loss", reading_loss)
    capsys.readouterr()
    make_bases.main(tiny + ["--out", str(tmp_path / "cut"), "--resume"])
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 6" in printed and "clip step" not in printed
    for name in ("clip", "llama"):
        for file in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (tmp_path / "whole" / name / file).read_bytes() == (tmp_path / "cut" / name / file).read_bytes()
    calls.clear()
    monkeypatch.setattr(make_bases, "reading_loss", interrupted)
    with pytest.raises(SystemExit, match="130"):
        make_bases.main(tiny + ["--out", str(tmp_path / "cut")])
    with pytest.raises(SystemExit, match="--resume: .* was written with other settings .--llm_lr 0.001 there, "
                                         "0.002 now.; run without --resume to start again"):
        make_bases.main(tiny + ["--out", str(tmp_path / "cut"), "--llm_lr", "0.002", "--resume"])


@pytest.mark.parametrize("flag, value, says", [("--threads", "0", "at least 1"), ("--llm_steps", "-3", "at least 0"),
                                              ("--llm_tokens", "0", "at least 1"),
                                              ("--llm_eval_every", "-1", "at least 0"),
                                              ("--llm_heads", "3", "split the width evenly"),
                                              ("--llm_kv_heads", "3", "must divide --llm_heads"),
                                              ("--device", "gpu", "one of cpu, cuda"),
                                              ("--dtype", "bf16", "one of float32, bfloat16"),
                                              ("--save_dtype", "bf16", "one of float16, bfloat16, float32")])
def test_a_count_out_of_range_is_refused_naming_the_flag_before_anything_is_written(tmp_path, flag, value, says):
    with pytest.raises(SystemExit) as exit:
        make_bases.main(TINY + [flag, value, "--out", str(tmp_path / "bases"), "--world_root", str(tmp_path / "world")])
    error = str(exit.value)
    assert error.startswith("make_bases.py: error: ") and flag in error and value in error and says in error
    assert not (tmp_path / "bases").exists() and not (tmp_path / "world").exists()


def test_resume_with_nothing_to_resume_is_refused_before_any_training(tmp_path):
    with pytest.raises(SystemExit, match=r"make_bases.py: error: --resume: nothing to resume in .*build \(no "
                                         r"llama_training.pt, no finished CLIP\); run without --resume to start"):
        make_bases.main(TINY + ["--resume", "--out", str(tmp_path / "bases"), "--world_root", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_an_out_that_cannot_be_a_directory_is_refused_before_any_training(tmp_path):
    (tmp_path / "afile").write_text("kept")
    with pytest.raises(SystemExit) as exit:
        make_bases.main(TINY + ["--out", str(tmp_path / "afile"), "--world_root", str(tmp_path / "world")])
    assert "--out " + str(tmp_path / "afile") in str(exit.value)
    assert (tmp_path / "afile").read_text() == "kept" and not (tmp_path / "world").exists()


def test_help_explains_every_flag_from_the_comments_in_settings(capsys):
    groups = flags.explained_fields(make_bases.Settings)
    assert [(name, bool(items)) for name, _, items in groups] == [("run", True), ("CLIP", True), ("LLaMA", True)]
    explained = {name: text for _, _, items in groups for name, text in items}
    assert list(explained) == [f.name for f in dataclasses.fields(make_bases.Settings)]  # each field, in order, once
    assert all(text.strip() for text in explained.values()), explained
    assert make_bases.main(["--help"]) is None
    printed = " ".join(capsys.readouterr().out.split())
    for name, text in explained.items():
        assert f"--{name}" in printed and " ".join(text.split()) in printed, name
