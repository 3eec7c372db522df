"""StopChecker: EOS / stop ids / stop strings / length, min_tokens, text truncation and streaming holdback."""

import random
import time

import pytest

from nexus_jax.core.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from nexus_jax.core.stop import StopChecker, StopStringScanner
from nexus_jax.core.tokenizer import IncrementalDetokenizer, Tokenizer
from runner.model.default_model import default_model_dir

EOS, STOP_ID, OTHER_EOS = 2, 3, 4
SPECIAL_TEXT = {EOS: "<eos>", STOP_ID: "<stop>", OTHER_EOS: "<eot>"}


class FakeDetokenizer:
    """Each token id decodes to a fixed piece. With lag, a token's text comes out one step late (as a real
    detokenizer holds an unfinished character), so text of earlier tokens shares a delta with the next token."""

    def __init__(self, vocab: dict[int, str], lag: bool) -> None:
        self.vocab, self.lag, self.pending, self.finished = vocab, lag, [], False

    def step(self, ids):
        assert not self.finished
        self.pending += [self.vocab[i] for i in ids]
        keep = 1 if self.lag else 0
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return "".join(out)

    def finish(self):
        self.finished = True
        out, self.pending = "".join(self.pending), []
        return out


def run(params, tokens, *, lag=False, eos_ids=(EOS, OTHER_EOS), max_new_tokens=None):
    """Feed `tokens` (str: a text piece, int: a special id) until the checker finishes.

    Returns the emitted deltas, the last result and how many tokens were consumed.
    """
    ids = [t if isinstance(t, int) else 100 + i for i, t in enumerate(tokens)]
    vocab = {**SPECIAL_TEXT, **{100 + i: t for i, t in enumerate(tokens) if isinstance(t, str)}}
    checker = StopChecker(params, FakeDetokenizer(vocab, lag), eos_ids, max_new_tokens)
    deltas = []
    for count, token_id in enumerate(ids, 1):
        result = checker.step(token_id)
        deltas.append(result.text)
        assert checker.num_generated == count
        if result.finished:
            return deltas, result, count
    return deltas, result, len(ids)


def reference(text, stops, include, after=0):
    """Brute force: cut at the stop string occurrence that ends first (then starts first), ending past `after`."""
    matches = [(i + len(s), i, s) for s in stops for i in range(len(text) - len(s) + 1)
               if text.startswith(s, i) and i + len(s) > after]
    if not matches:
        return text, None
    end, start, stop = min(matches)
    return text[:end if include else start], stop


def random_split(rng, text):
    """Random pieces: single characters, a few characters, or the whole text at once."""
    if not text:
        return []
    mode = rng.choice(("chars", "few", "whole"))
    if mode == "chars":
        return list(text)
    if mode == "whole":
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(len(text) - 1, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def random_case(rng):
    text = "".join(rng.choice("abc x") for _ in range(rng.randint(0, 30)))
    pool = ["ab", "bca", "cc", "x a", "abcab", "c", "aaa", "b x"]
    stops = rng.sample(pool, rng.randint(1, 3))
    if text and rng.random() < 0.5:
        i = rng.randrange(len(text))
        stops.append(text[i:i + rng.randint(1, 5)])
    return text, stops


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("lag", [False, True])
def test_stop_strings_independent_of_token_split(include, lag):
    rng = random.Random(1234 + include + 2 * lag)
    for _ in range(300):
        text, stops = random_case(rng)
        expected, expected_stop = reference(text, stops, include)
        for _ in range(4):
            pieces = random_split(rng, text) + ["!"]  # a last token, so a text without a match ends by length
            params = SamplingParams(stop=stops, include_stop_str_in_output=include, max_tokens=len(pieces))
            deltas, result, _ = run(params, pieces, lag=lag)
            case = (text, stops, pieces)
            assert "".join(deltas) == (expected if expected_stop else text + "!"), case
            if expected_stop is None:
                assert (result.finish_reason, result.stop_reason) == ("length", None), case
            else:
                assert (result.finish_reason, result.stop_reason) == ("stop", expected_stop), case
            # Deltas cannot be taken back, so the equality above means no delta ran past the cut. Holdback is
            # bounded too: only a possible start of a stop string is held, and nothing with include.
            held_at_most = 0 if include else max(map(len, stops)) - 1
            for k in range(1, len(deltas)):
                released = "".join(pieces[:k - lag])  # what the detokenizer had handed over after k tokens
                assert len("".join(deltas[:k])) >= len(released) - held_at_most, case


def test_holdback_of_a_possible_stop_string():
    params = SamplingParams(stop=["</end>"], max_tokens=10)
    deltas, result, _ = run(params, ["abc<", "/e", "nd", "> tail"])
    assert deltas == ["abc", "", "", ""] and result.stop_reason == "</end>"
    # A prefix that turns out not to be the stop string is released as soon as that is known.
    deltas, result, _ = run(params, ["abc<", "/e", "x<", "/", "q"], max_new_tokens=5)
    assert deltas == ["abc", "", "</ex", "", "</q"] and result.finish_reason == "length"
    # At the end the held text is released, since the sequence finished another way.
    deltas, result, _ = run(params, ["abc", "</en", EOS])
    assert deltas == ["abc", "", "</en"] and (result.finish_reason, result.stop_reason) == ("stop", None)
    # Nothing is held back when the stop string would be kept anyway.
    params = SamplingParams(stop=["</end>"], include_stop_str_in_output=True)
    deltas, result, _ = run(params, ["abc<", "/e", "nd>", " tail"])
    assert deltas == ["abc<", "/e", "nd>"] and result.stop_reason == "</end>"


def test_stop_string_text_after_it_never_emitted():
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    deltas, result, count = run(params, ["go ST", "OP and more", "never"])
    assert "".join(deltas) == "go STOP" and count == 2
    params = SamplingParams(stop=["STOP"])
    deltas, _, _ = run(params, ["go ST", "OP and more", "never"])
    assert "".join(deltas) == "go "


def test_multiple_stop_strings_first_completed_wins():
    for stops in (["world", "lo w"], ["lo w", "world"]):
        deltas, result, _ = run(SamplingParams(stop=stops), ["hello world"])
        assert "".join(deltas) == "hel" and result.stop_reason == "lo w"
    for stops in (["cd", "bcd"], ["bcd", "cd"]):  # same end: the one starting first
        deltas, result, _ = run(SamplingParams(stop=stops), ["abcde"])
        assert "".join(deltas) == "a" and result.stop_reason == "bcd"
        deltas, result, _ = run(SamplingParams(stop=stops, include_stop_str_in_output=True), list("abcde"))
        assert "".join(deltas) == "abcd" and result.stop_reason == "bcd"


@pytest.mark.parametrize("lag", [False, True])
def test_stop_tokens(lag):
    pieces = ["a", "b", EOS, "c"]
    deltas, result, count = run(SamplingParams(), pieces, lag=lag)
    assert ("".join(deltas), count, result.finish_reason, result.stop_reason) == ("ab", 3, "stop", None)
    deltas, result, count = run(SamplingParams(), ["a", OTHER_EOS], lag=lag)  # any of the tokenizer's eos ids
    assert ("".join(deltas), count, result.finish_reason) == ("a", 2, "stop")
    deltas, result, count = run(SamplingParams(stop_token_ids=[STOP_ID]), ["a", STOP_ID, "b"], lag=lag)
    assert ("".join(deltas), count, result.finish_reason, result.stop_reason) == ("a", 2, "stop", STOP_ID)
    # include_stop_str_in_output keeps the stop token's text, as in vLLM.
    params = SamplingParams(stop_token_ids=[STOP_ID], include_stop_str_in_output=True)
    deltas, result, _ = run(params, ["a", STOP_ID], lag=lag)
    assert "".join(deltas) == "a<stop>" and result.stop_reason == STOP_ID
    deltas, result, _ = run(SamplingParams(include_stop_str_in_output=True), ["a", EOS], lag=lag)
    assert "".join(deltas) == "a<eos>" and result.stop_reason is None


def test_ignore_eos():
    params = SamplingParams(ignore_eos=True, stop_token_ids=[OTHER_EOS], max_tokens=5)
    deltas, result, count = run(params, ["a", EOS, "b", OTHER_EOS, "c"])
    assert ("".join(deltas), count, result.stop_reason) == ("a<eos>b", 4, OTHER_EOS)
    deltas, result, count = run(SamplingParams(ignore_eos=True, max_tokens=3), ["a", EOS, EOS, "x"])
    assert (count, result.finish_reason) == (3, "length")


def test_min_tokens_suppresses_every_stop():
    params = SamplingParams(min_tokens=3, stop=["zz"], stop_token_ids=[STOP_ID])
    deltas, result, count = run(params, ["zz", STOP_ID, EOS, "a", EOS])
    # Tokens 1..3 cannot stop; the text of suppressed stops is ordinary text.
    assert ("".join(deltas), count, result.finish_reason, result.stop_reason) == ("zz<stop><eos>a", 5, "stop", None)
    deltas, result, count = run(params, ["a", "b", "c", STOP_ID])
    assert (count, result.stop_reason) == (4, STOP_ID)
    # A stop string that starts during min_tokens and completes after it does stop.
    deltas, result, count = run(params, ["a", "b", "z", "z", "tail"])
    assert ("".join(deltas), count, result.stop_reason) == ("ab", 4, "zz")
    deltas, result, count = run(SamplingParams(min_tokens=2, max_tokens=2), ["x", EOS, "never"])
    assert (count, result.finish_reason) == (2, "length")


def test_min_tokens_random_against_reference():
    rng = random.Random(7)
    for _ in range(300):
        text, stops = random_case(rng)
        pieces = random_split(rng, text) + ["!"]
        min_tokens = rng.randint(0, len(pieces))
        params = SamplingParams(stop=stops, min_tokens=min_tokens, max_tokens=len(pieces))
        deltas, result, _ = run(params, pieces)
        expected, stop = reference(text + "!", stops, False, after=len("".join(pieces[:min_tokens])))
        assert "".join(deltas) == expected and result.stop_reason == stop, (text, stops, pieces, min_tokens)


def test_length():
    deltas, result, count = run(SamplingParams(max_tokens=3), ["a", "b", "c", "d"])
    assert ("".join(deltas), count, result.finish_reason, result.stop_reason) == ("abc", 3, "length", None)
    deltas, result, count = run(SamplingParams(max_tokens=3), ["a", "b", EOS])  # EOS on the last token: stop
    assert (count, result.finish_reason) == (3, "stop")
    deltas, result, count = run(SamplingParams(max_tokens=3, stop=["bc"]), ["a", "b", "c"])
    assert ("".join(deltas), result.finish_reason, result.stop_reason) == ("a", "stop", "bc")
    deltas, result, count = run(SamplingParams(max_tokens=8), ["a"] * 9, max_new_tokens=5)  # context room
    assert (count, result.finish_reason) == (5, "length")
    deltas, result, count = run(SamplingParams(max_tokens=None), ["a"] * 9, max_new_tokens=4)
    assert (count, result.finish_reason) == (4, "length")
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopChecker(SamplingParams(max_tokens=None), None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopChecker(SamplingParams(), None, max_new_tokens=0)


def test_token_only_sequence_and_misuse():
    checker = StopChecker(SamplingParams(max_tokens=4, stop_token_ids=[STOP_ID]), None, [EOS])
    results = [checker.step(t) for t in (7, 8, STOP_ID)]
    assert [r.text for r in results] == ["", "", ""] and results[-1].stop_reason == STOP_ID
    with pytest.raises(RuntimeError, match="finished"):
        checker.step(9)
    with pytest.raises(ValueError, match="detokenizer"):
        StopChecker(SamplingParams(stop=["x"]), None)
    with pytest.raises(ValueError, match="non-empty"):
        StopStringScanner(["a", ""], include_in_output=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXUS_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return Tokenizer.from_dir(default_model_dir())


@pytest.mark.parametrize("skip", [True, False])
def test_with_real_detokenizer(tokenizer, skip):
    rng = random.Random(3)
    text = "The queue 🙂 holds requests.\nUser: hi there 中文 and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.eos_token_ids[0]
    for stop in (["User:"], ["🙂 h"], ["e 中"], ["nope", "ds.\nU"], ["zzz"]):
        for include in (False, True):
            params = SamplingParams(stop=stop, include_stop_str_in_output=include, skip_special_tokens=skip,
                                    max_tokens=len(ids) + 1)
            checker = StopChecker(params, IncrementalDetokenizer(tokenizer, skip_special_tokens=skip),
                                  tokenizer.eos_token_ids)
            emitted = []
            for token_id in ids + [eos]:
                result = checker.step(token_id)
                emitted.append(result.text)
                if result.finished:
                    break
            expected, expected_stop = reference(tokenizer.decode(ids), stop, include)
            if expected_stop is None and include:  # stopped by EOS, whose text include_stop_str_in_output keeps
                expected += tokenizer.decode([eos], skip_special_tokens=skip)
            assert "".join(emitted) == expected and result.stop_reason == expected_stop
            assert result.finish_reason == "stop"
    # EOS right after half a character: the detokenizer's held bytes are flushed, EOS itself is not decoded.
    emoji_ids = tokenizer.encode("ok 🙂", add_special_tokens=False)
    cut = emoji_ids[:-rng.randint(1, 2)]
    checker = StopChecker(SamplingParams(skip_special_tokens=skip),
                          IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), tokenizer.eos_token_ids)
    emitted = "".join(checker.step(t).text for t in cut + [eos])
    assert emitted == tokenizer.decode(cut) and checker.finish_reason == "stop"


def test_stop_matching_costs_the_new_text_not_the_stop_strings():
    """The most and longest stop strings SamplingParams allows, each almost matching the text: a piece of new
    text must cost about as much as with one short string (scanning every string for every token made an
    attacker's list stall the engine for everyone)."""
    rng = random.Random(5)
    longest = MAX_STOP_STRING_CHARS
    stops = ["a" * (longest - 8 - rng.randrange(longest // 2)) + chr(98 + i % 20) + "x" * (i // 20)
             for i in range(MAX_STOP_STRINGS)]
    params = SamplingParams(stop=stops)
    assert len(params.stop) == MAX_STOP_STRINGS and max(map(len, params.stop)) <= longest

    def seconds(scanner, pieces=2000):
        started = time.perf_counter()
        for _ in range(pieces):
            text, stop = scanner.feed("aa")
            assert stop is None
        return time.perf_counter() - started
    StopStringScanner(params.stop, include_in_output=False)  # built once, as one request's n scanners share it
    heavy = min(seconds(StopStringScanner(params.stop, include_in_output=False)) for _ in range(3))
    light = min(seconds(StopStringScanner(["zz"], include_in_output=False)) for _ in range(3))
    assert heavy < 5 * light + 0.02, (heavy, light)
    scanner = StopStringScanner(params.stop, include_in_output=False)
    held = max(len(s.rstrip("x")) - 1 for s in stops)  # the longest run of "a" some string starts with
    assert scanner.feed("a" * 600) == ("a" * (600 - held), None)
    assert scanner.feed("c") == ("a" * (held - len(stops[1]) + 1), stops[1])
