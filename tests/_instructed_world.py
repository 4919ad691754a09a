"""The tiny InstructEd test world: facts, edits, multi-hop cases and the base model's pretraining.

Why the base is built this way
------------------------------
InstructEd keeps the LLM frozen and trains soft prefixes ``P_l`` that join the attention of a few
middle layers (Han et al. 2024, Eqs. 8-13), so that the model answers from an instruction it does not
use well on its own (Table 13: without the prefixes Gen and Loc drop). A test of the method needs a
base that (a) cannot use the instruction by itself and (b) holds an ability that prefixes in layers
1-2 can switch on. What did not work on the plugin's 4-layer tiny LLaMA (held-out edits, tried while
building this world):

* a base pretrained to read ``Instructions: {fact}\nInput: {question}`` needs no prefixes (issue #11:
  trained prefixes, a random bank and no prefixes gave the same scores);
* a base that reads facts in another layout ("{fact}\n{question}"): prefix training did not unlock
  it (Rel 46 after training, 58 without prefixes);
* a base that reads only after a marker token: the prefixes cannot stand in for a token that every
  layer sees (Rel 17 after training).

So the base is pretrained (all weights, :func:`pretrain_world_base`, 700 steps) on:

* **closed-book questions** about 12 people (city, sport, mother tongue, occupation, best friend)
  and two-hop questions ("Where does the best friend of X live?"): the facts it *knows*;
* **instruction documents** in the plugin's layout whose instruction is a generic one ("Answer the
  question with a single word.") or a fact (also two chained ones), continued the way instruction
  data usually is: ``...Input: {question}\nOutput: {closed-book answer}``, with no prefix or with a
  *random* prefix bank (a fresh ``N(0, 1)`` draw per example: the distribution InstructEd's prefixes
  start from). Given an instruction, the base writes ``\nOutput:`` instead of answering, and never
  from the fact: Rel, Gen and Loc are 0 without trained prefixes;
* **instruction-following documents**: the same layout, answered right after the question -- from
  the instruction when it concerns the question (a 1-hop fact in statement or question-answer form,
  or two chained facts for a two-hop question), else from memory (a fact about another person, half of
  the time with the same relation; or, for a two-hop question, a second fact about someone who is
  not X's friend) -- with a *fixed* prefix bank ``T`` (the "trigger": drawn from the same ``N(0, 1)``
  with its own seed, plus up to as much fresh noise, thrown away after pretraining) joining the
  attention of layers 1-2, and InstructEd's re-weighting by ``sim`` (for 1-hop facts the cosine the
  plugin's default sentence encoder gives question and instruction, as at inference).

The base thus holds an instruction-following mode that only prefixes in layers 1-2 can reach, and
that a random bank does not reach (the noise added to ``T`` widens what reaches it, so that gradient
descent from a random bank finds it: without it, training got stuck for 1 of 6 seeds).
:class:`~instructedit_plugin.instructed.trainer.InstructEdTrainer` starts from its own random bank
(another seed than ``T``) and has to *find* prefixes that switch the mode on, from the training edits
alone; the held-out edits measure whether it did. The trigger is injected by
:func:`_trigger_attention`, a reference implementation of Eqs. 9-15 written for this world (eager
attention, prefix keys/values from the layer's own ``k_proj``/``v_proj``, no rotary embedding,
probabilities of prefix and instruction columns times ``sim``), independent of the plugin's
``attention.py``: breaking the plugin's attention or trainer does not change the world.

Limits of the world: the first fact of a chain alone (its answer, the new friend's known city, needs a
fact from the context composed with one from the weights) and person-valued questions with an
instruction ("Who is the best friend of X?") are not taught; a retrieved fact about another person
with the same relation is ignored about 85% of the time.

The base folder is cached by content key (this file's text, the pretraining settings, the tiny
LLaMA's folder) under the models cache (``$INSTRUCTEDIT_CACHE`` when set, else the session's temp
folder); pretraining takes ~25 s on one CPU thread.
"""
from __future__ import annotations

import functools
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructedit_plugin.models.cache import atomic_dir, content_key, read_json, write_json

SUBJECTS = ["Lionel Messi", "Tiger Woods", "Mozart", "Beethoven", "Marie Curie", "Tim Cook", "Leo Tolstoy",
            "Michael Jordan", "Roger Federer", "Albert Einstein", "Pablo Picasso", "Danielle Darrieux"]
#: relation -> (objects, statement, [question, rephrase])
RELATIONS: dict[str, tuple[list[str], str, list[str]]] = {
    "city": (["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "London", "Ottawa"],
             "{} lives in {}.", ["Where does {} live?", "In which city does {} live?"]),
    "sport": (["soccer", "basketball", "tennis", "golf"],
              "{} plays {}.", ["Which sport does {} play?", "What sport does {} play?"]),
    "language": (["French", "Spanish", "German", "English"],
                 "The mother tongue of {} is {}.", ["What is the mother tongue of {}?", "What is the native language of {}?"]),
    "job": (["physicist", "chemist", "painter", "composer"],
            "{} works as a {}.", ["What is the occupation of {}?", "What does {} work as?"]),
}
#: the bridge of the two-hop questions (known closed-book; edited only in two-hop cases)
FRIEND = (SUBJECTS, "The best friend of {} is {}.", ["Who is the best friend of {}?", "Who is {}'s best friend?"])
_ALL = {**RELATIONS, "friend": FRIEND}
#: relations asked through the best friend: "Where does the best friend of X live?"
TWO_HOP: dict[str, list[str]] = {
    "city": ["Where does the best friend of {} live?", "In which city does the best friend of {} live?"],
}
GENERIC_INSTRUCTIONS = ["Answer the question with a single word.", "Give a short answer to the question.",
                        "Complete the sentence with the correct fact.", "Please answer the question."]
HEAD, TAIL = "Instructions: ", "\nInput: "  # the plugin's default template, split at {instruction}
PREFIX_LAYERS, PREFIX_LEN, INIT_STD = (1, 2), 5, 1.0  # as in hparams/TRAINING/InstructEd/tiny.yaml
#: base pretraining; trigger_seed != the trainer's seed 0 (the trainer must find its own prefixes)
PRETRAIN = dict(steps=700, batch=32, lr=5e-3, warmup=30, seed=0, trigger_seed=20240611, trigger_noise=1.0,
                same_relation=0.5)
N_TRAIN_EDITS, N_TEST_EDITS = 40, 8


# ----------------------------------------------------------------------------------------------
# Facts and edits
# ----------------------------------------------------------------------------------------------
def world() -> dict[tuple[str, str], str]:
    """The facts the base knows: ``(subject, relation) -> object``."""
    rng = random.Random(0)
    out = {}
    for s in SUBJECTS:
        for r, (objects, _, _) in _ALL.items():
            out[(s, r)] = rng.choice([o for o in objects if o != s])
    return out


def two_hop_answer(facts: dict, subject: str, relation: str) -> str:
    """The known answer to "... the best friend of ``subject`` ...": ``relation`` of the friend."""
    return facts[(facts[(subject, "friend")], relation)]


def statement(subject: str, relation: str, obj: str) -> str:
    return _ALL[relation][1].format(subject, obj)


def qa_instruction(subject: str, relation: str, obj: str) -> str:
    """ZsRE-style instruction (question + answer), what the plugin builds from prompt + target_new."""
    return f"{_ALL[relation][2][0].format(subject)} {obj}."


def make_edits(n: int, seed: int = 1) -> list[dict]:
    """``n`` edit requests (distinct subject/relation pairs, new object != the world's) with an
    instruction (every other one in statement form, the others left to the plugin, which builds the
    question-answer form), a rephrase and a locality question about another person: the same
    relation for half of them (CounterFact's neighbourhood prompts), another relation for the rest."""
    facts = world()
    rng = random.Random(seed)
    pairs = [(s, r) for s in SUBJECTS for r in RELATIONS]
    rng.shuffle(pairs)
    out = []
    for i, (s, r) in enumerate(pairs[:n]):
        objects, _, questions = RELATIONS[r]
        new = rng.choice([o for o in objects if o not in (facts[(s, r)], s)])
        s2 = rng.choice([x for x in SUBJECTS if x != s])
        r2 = r if i % 4 < 2 else rng.choice([x for x in RELATIONS if x != r])  # half: CounterFact-style neighbours
        req = dict(prompt=questions[0].format(s), rephrase_prompt=questions[1].format(s), target_new=new,
                   ground_truth=facts[(s, r)], subject=s,
                   locality={"neighborhood": {"prompt": RELATIONS[r2][2][0].format(s2), "ground_truth": facts[(s2, r2)]}})
        if i % 2 == 0:
            req["instruction"] = statement(s, r, new)
        out.append(req)
    return out


@dataclass(frozen=True)
class Chain:
    """A two-hop case: X's best friend becomes ``friend`` (fact 1) and ``friend`` moves to ``city``
    (fact 2); "Where does the best friend of X live?" is answered ``city`` only with both facts."""

    subject: str
    friend: str
    city: str
    old_friend: str
    old_city: str  # the unedited two-hop answer
    friend_city: str  # where the new friend lives before fact 2

    @property
    def fact1(self) -> str:
        return statement(self.subject, "friend", self.friend)

    @property
    def fact2(self) -> str:
        return statement(self.friend, "city", self.city)

    @property
    def question(self) -> str:
        return TWO_HOP["city"][0].format(self.subject)


def make_chain(subject: str = "Mozart", seed: int = 3) -> Chain:
    """A two-hop edit about ``subject`` whose new answer differs from every answer the facts alone give."""
    facts = world()
    rng = random.Random(seed)
    old_friend = facts[(subject, "friend")]
    friend = rng.choice([s for s in SUBJECTS if s not in (subject, old_friend)])
    old_city, friend_city = facts[(old_friend, "city")], facts[(friend, "city")]
    city = rng.choice([c for c in RELATIONS["city"][0] if c not in (old_city, friend_city)])
    return Chain(subject, friend, city, old_friend, old_city, friend_city)


def _rewrite(prompt: str, subject: str, new: str, true: str, question: str) -> dict:
    return {"prompt": prompt, "relation_id": "P0", "subject": subject, "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"}, "question": question}


def chain_rewrites(chain: Chain) -> tuple[dict, dict]:
    """The chain's two facts as MQuAKE ``requested_rewrite`` entries (their instructions are
    :attr:`Chain.fact1` and :attr:`Chain.fact2`)."""
    first = _rewrite("The best friend of {} is", chain.subject, chain.friend, chain.old_friend,
                     FRIEND[2][0].format(chain.subject))
    second = _rewrite("{} lives in", chain.friend, chain.city, chain.friend_city,
                      RELATIONS["city"][2][0].format(chain.friend))
    return first, second


def distractor_rewrites(chain: Chain, n: int = 3, seed: int = 4) -> list[dict]:
    """``n`` edits of other people's cities (nobody in the chain): what else the memory holds."""
    facts = world()
    rng = random.Random(seed)
    people = [s for s in SUBJECTS if s not in (chain.subject, chain.friend, chain.old_friend)]
    out = []
    for s in rng.sample(people, n):
        city = rng.choice([c for c in RELATIONS["city"][0] if c != facts[(s, "city")]])
        out.append(_rewrite("{} lives in", s, city, facts[(s, "city")], RELATIONS["city"][2][0].format(s)))
    return out


def mquake_record(case_id: int, chain: Chain, rewrites: list[dict]) -> dict:
    """A two-hop MQuAKE record (the dataset's JSON layout) about ``chain`` whose requested rewrites
    are ``rewrites`` (the chain's facts, or some of them, and distractors)."""
    def hop(question, cloze, answer):
        return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": []}

    subject = chain.subject
    return {"case_id": case_id, "requested_rewrite": rewrites,
            "questions": [q.format(subject) for q in TWO_HOP["city"]],
            "answer": chain.old_city, "answer_alias": [], "new_answer": chain.city, "new_answer_alias": [],
            "single_hops": [], "new_single_hops": [
                hop(FRIEND[2][0].format(subject), f"The best friend of {subject} is", chain.friend),
                hop(RELATIONS["city"][2][0].format(chain.friend), f"{chain.friend} lives in", chain.city)]}


def world_lm(world_dict: dict, prefixes: str = "trained"):
    """``(InstructedLM, tokenizer)`` on the world's base: ``prefixes`` "trained" (the archive) or
    "none" (the instruction in context on the plain model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructedit_plugin.instructed.checkpoint import load_checkpoint
    from instructedit_plugin.instructed.lm import InstructedLM, load_encoder

    tok = AutoTokenizer.from_pretrained(world_dict["base_dir"])
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(world_dict["base_dir"]).eval()
    bank = load_checkpoint(world_dict["archive"]).bank
    return InstructedLM(base, tok, bank, encoder=load_encoder("default"), use_prefixes=prefixes == "trained"), tok


# ----------------------------------------------------------------------------------------------
# Pretraining texts
# ----------------------------------------------------------------------------------------------
@dataclass
class Doc:
    question: str
    answer: str
    instruction: str | None = None  # None: plain text, no template
    prefix: str = "none"  # none | trigger | random
    sim: float | None = 1.0  # None: cos(Enc(question), Enc(instruction)) by the sentence encoder


def _sample(rng: random.Random, facts: dict) -> Doc:
    s, r = rng.choice(SUBJECTS), rng.choice(list(RELATIONS))
    objects, _, questions = RELATIONS[r]
    q = rng.choice(questions).format(s)
    old = facts[(s, r)]
    new = rng.choice([o for o in objects if o != old])
    s2 = rng.choice([x for x in SUBJECTS if x != s])
    r2 = r if rng.random() < PRETRAIN["same_relation"] else rng.choice([x for x in _ALL if x != r])  # unrelated: another person
    o2 = rng.choice([o for o in _ALL[r2][0] if o != s2])
    fact = statement if rng.random() < 0.5 else qa_instruction
    hop_q = rng.choice(TWO_HOP["city"]).format(s)
    u = rng.random()
    if u < 0.12:  # closed book
        return Doc(q, old) if rng.random() < 0.8 else Doc(rng.choice(FRIEND[2]).format(s), facts[(s, "friend")])
    if u < 0.16:
        return Doc(hop_q, two_hop_answer(facts, s, "city"))
    if u < 0.36:  # instruction-following: the fact concerns the question
        return Doc(q, new, fact(s, r, new), "trigger", None)
    if u < 0.62:  # ... it does not
        return Doc(q, old, fact(s2, r2, o2), "trigger", None)
    if u < 0.88:  # two-hop
        friend = rng.choice([x for x in SUBJECTS if x not in (s, facts[(s, "friend")])])
        city = rng.choice([o for o in RELATIONS["city"][0] if o != facts[(friend, "city")]])
        f1, f2 = statement(s, "friend", friend), statement(friend, "city", city)
        s3 = rng.choice([x for x in SUBJECTS if x not in (s, friend, facts[(s, "friend")])])
        other = statement(s3, "city", rng.choice(RELATIONS["city"][0]))
        if rng.random() < 0.6:  # both facts (retrieval gives them hop by hop; either order may come)
            parts = [f1, f2] if rng.random() < 0.7 else [f2, f1]
            return Doc(hop_q, city, " ".join(parts), "trigger", rng.uniform(0.4, 1.0))
        # only the second fact (about someone who is not X's friend), maybe with an unrelated one:
        # the known answer
        parts = rng.choice([[f2], [f2, other], [other, f2]])
        return Doc(hop_q, two_hop_answer(facts, s, "city"), " ".join(parts), "trigger", rng.uniform(0.2, 0.9))
    # instruction documents without the trigger: "\nOutput: <closed-book answer>"
    ins = rng.choice(GENERIC_INSTRUCTIONS + [fact(s, r, new), fact(s2, r2, o2)])
    question, answer = q, old
    if rng.random() < 0.2:  # a two-hop question, after the new friend's facts too
        friend = rng.choice([x for x in SUBJECTS if x not in (s, facts[(s, "friend")])])
        chain = [statement(s, "friend", friend), statement(friend, "city", rng.choice(RELATIONS["city"][0]))]
        ins = rng.choice([ins, " ".join(chain), chain[1]])
        question, answer = hop_q, two_hop_answer(facts, s, "city")
    sim = 1.0 if rng.random() < 0.3 else rng.uniform(0.0, 1.0)
    return Doc(question, "\nOutput: " + answer, ins, "random" if rng.random() < 0.5 else "none", sim)


@functools.lru_cache(maxsize=None)
def _ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def _encode(tok, doc: Doc) -> tuple[list[int], int, tuple[int, int] | None]:
    """Ids laid out as the plugin lays them out (template pieces, instruction and ``question + ' ' +
    answer`` tokenised separately), the first answer position, and the instruction span."""
    enc = lambda text: list(_ids(tok, text))  # noqa: E731
    qa = enc(f"{doc.question} {doc.answer}\n" if not doc.answer.startswith("\n") else f"{doc.question}{doc.answer}\n")
    q_len = len(enc(doc.question))
    if doc.instruction is None:
        return qa, q_len, None
    head, body = enc(HEAD), enc(doc.instruction)
    pre = head + body + enc(TAIL)
    return pre + qa, len(pre) + q_len, (len(head), len(head) + len(body))


# ----------------------------------------------------------------------------------------------
# Reference InstructEd attention used to plant the trigger (pretraining only)
# ----------------------------------------------------------------------------------------------
WORLD_ATTENTION = "instructedit_test_world"
_CALL: dict = {}


def _trigger_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention plus, for the rows of the current call, per-row prefix keys/values in layers
    1-2 (``k_proj``/``v_proj`` of the prefix vectors, no rotary embedding, visible to every query of a
    row whose prefix is on) and Eq. 15's re-weighting (probabilities of the prefix columns and of the
    instruction span times the row's ``sim``, not renormalised)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    scaling = head_dim ** -0.5 if scaling is None else scaling
    bias = attention_mask[..., : key.shape[2]].float()
    kv_len = key.shape[2]
    prefix = _CALL.get("prefix", {}).get(module.layer_idx)
    n_prefix = 0
    if prefix is not None:  # [batch, P, hidden]
        n_prefix = prefix.shape[1]
        pk = module.k_proj(prefix).view(batch, n_prefix, kv_heads, head_dim).transpose(1, 2)
        pv = module.v_proj(prefix).view(batch, n_prefix, kv_heads, head_dim).transpose(1, 2)
        key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        on = _CALL["prefix_on"].to(query.device)
        prefix_bias = torch.where(on, 0.0, torch.finfo(torch.float32).min).view(batch, 1, 1, 1)
        bias = torch.cat([prefix_bias.expand(batch, 1, q_len, n_prefix), bias.expand(batch, 1, q_len, kv_len)], -1)
    rep = heads // kv_heads
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    probs = torch.softmax((query @ key.transpose(2, 3)) * scaling + bias, dim=-1)
    if "sim" in _CALL:
        sim = _CALL["sim"].to(query.device)[:, None]
        spans = _CALL["spans"].to(query.device)
        pos = torch.arange(kv_len, device=query.device)[None]
        weight = torch.where((pos >= spans[:, :1]) & (pos < spans[:, 1:]), sim, 1.0)
        if n_prefix:
            on = _CALL["prefix_on"].to(query.device)[:, None]
            weight = torch.cat([torch.where(on, sim, 1.0).expand(batch, n_prefix), weight], -1)
        probs = probs * weight[:, None, None, :]
    out = (probs.to(value.dtype) @ value).transpose(1, 2).contiguous()
    return out, None


def _register_world_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(WORLD_ATTENTION, _trigger_attention)
    AttentionMaskInterface.register(WORLD_ATTENTION, eager_mask)


class _Similarity:
    """``cos(Enc(question), Enc(instruction))`` with the plugin's default sentence encoder (what
    InstructEd computes at inference), every text encoded once."""

    def __init__(self):
        from instructedit_plugin.instructed.lm import load_encoder

        self.encoder = load_encoder("default")
        self.vectors: dict[str, torch.Tensor] = {}

    def add(self, texts) -> None:
        new = sorted({t for t in texts if t not in self.vectors})
        if new:
            vecs = torch.as_tensor(self.encoder.encode(new), dtype=torch.float32)
            self.vectors.update(zip(new, torch.nn.functional.normalize(vecs, dim=-1)))

    def __call__(self, question: str, instruction: str) -> float:
        self.add([question, instruction])
        return float(self.vectors[question] @ self.vectors[instruction])


def _batch(tok, docs: list[Doc], trigger: torch.Tensor, gen: torch.Generator, similarity: _Similarity):
    for d in docs:
        if d.sim is None:
            d.sim = similarity(d.question, d.instruction)
    rows = [_encode(tok, d) for d in docs]
    width = max(len(ids) for ids, _, _ in rows)
    n = len(rows)
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    spans = torch.zeros(n, 2, dtype=torch.long)
    for i, (seq, cut, span) in enumerate(rows):
        pad = width - len(seq)
        ids[i, pad:] = torch.tensor(seq)
        mask[i, pad:] = 1
        labels[i, pad + cut:] = torch.tensor(seq[cut:])
        if span is not None:
            spans[i] = torch.tensor(span) + pad
    prefix = {}
    for j, layer in enumerate(PREFIX_LAYERS):
        rand = torch.randn(n, PREFIX_LEN, trigger.shape[-1], generator=gen) * INIT_STD
        use_trigger = torch.tensor([d.prefix == "trigger" for d in docs])[:, None, None]
        noise = PRETRAIN["trigger_noise"] * torch.rand(n, 1, 1, generator=gen)
        prefix[layer] = torch.where(use_trigger, trigger[j][None] + noise * rand, rand)
    call = {"prefix": prefix, "prefix_on": torch.tensor([d.prefix != "none" for d in docs]),
            "sim": torch.tensor([d.sim for d in docs], dtype=torch.float32), "spans": spans}
    return ids, mask, labels, call


def pretrain_world_base(src: Path, dst: Path) -> dict:
    """Pretrain the tiny LLaMA at ``src`` on the world (see the module docstring) and save it to ``dst``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = PRETRAIN
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    facts = world()
    rng = random.Random(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    trigger = torch.randn(len(PREFIX_LAYERS), PREFIX_LEN, model.config.hidden_size,
                          generator=torch.Generator().manual_seed(cfg["trigger_seed"])) * INIT_STD
    _register_world_attention()
    model.set_attn_implementation(WORLD_ATTENTION)
    similarity = _Similarity()
    similarity.add([q.format(x) for x in SUBJECTS for _, _, qs in _ALL.values() for q in qs]
                   + [f(x, r, o) for x in SUBJECTS for r, (objects, _, _) in _ALL.items() for o in objects
                      for f in (statement, qa_instruction)])
    steps = cfg["steps"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * max(0.02, 1 - s / steps))
        model.train()
        losses = []
        t0 = time.perf_counter()
        batches: list[list[Doc]] = []
        for _ in range(steps):
            if not batches:  # draw 4 batches at once and group them by length (less padding)
                pool = sorted((_sample(rng, facts) for _ in range(4 * cfg["batch"])), key=lambda d: len(_encode(tok, d)[0]))
                batches = [pool[i * cfg["batch"]:(i + 1) * cfg["batch"]] for i in range(4)]
                rng.shuffle(batches)
            ids, mask, labels, call = _batch(tok, batches.pop(), trigger, gen, similarity)
            _CALL.clear()
            _CALL.update(call)
            try:
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            finally:
                _CALL.clear()
            targets = labels[:, 1:]
            keep = targets != -100  # the output layer only where there is a label
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), targets[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    model.set_attn_implementation("sdpa")
    info = {"final_loss": sum(losses[-20:]) / 20, "seconds": time.perf_counter() - t0, "steps": steps}
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    torch.save({"trigger": trigger}, dst / "trigger.pt")  # for diagnostics only; not an InstructEd archive
    write_json(dst / "world.json", info)
    return info


def world_base_dir(root: Path, tiny_llama: Path) -> Path:
    """The pretrained world base under ``root`` (built once per content key)."""
    key = content_key({"pretrain": PRETRAIN, "src": Path(tiny_llama).name,
                       "recipe": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()})
    target = Path(root) / f"instructed-world-base-{key}"
    if read_json(target / "world.json") is not None and (target / "model.safetensors").is_file():
        return target
    with atomic_dir(target) as tmp:
        pretrain_world_base(Path(tiny_llama), tmp)
    return target


# ----------------------------------------------------------------------------------------------
# Scoring (EasyEdit's teacher-forced token metrics, on an InstructedLM with gold instructions)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _answer_tokens(lm, tok, question: str, answer: str, instruction: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy predictions at the answer tokens of ``question + ' ' + answer`` (teacher forced) and
    those tokens, as EasyEdit scores ``rewrite_acc``; ``instruction`` None: no instruction."""
    q_len = len(tok(question)["input_ids"])
    enc = tok([f"{question} {answer}"], return_tensors="pt")
    kwargs = {} if instruction is None else {"instructions": [instruction]}
    logits = lm(**enc, **kwargs).logits
    return logits[0, q_len - 1:-1].argmax(-1), enc["input_ids"][0, q_len:]


def gold_scores(lm, base, tok, requests: list[dict]) -> dict[str, float]:
    """Rel / Gen / Loc (percent) of ``lm`` with each request's own instruction in front of its
    question, rephrase and locality question (the paper's gold-instruction setting): Rel and Gen
    are the token accuracy on ``target_new``; Loc is the share of locality answer tokens predicted as
    the unedited ``base`` predicts them without any instruction."""
    from instructedit_plugin.instructed.templates import instruction_of

    rel = gen = loc = 0.0
    for req in requests:
        ins = instruction_of(req)
        pred, gold = _answer_tokens(lm, tok, req["prompt"], req["target_new"], ins)
        rel += float((pred == gold).float().mean())
        pred, gold = _answer_tokens(lm, tok, req["rephrase_prompt"], req["target_new"], ins)
        gen += float((pred == gold).float().mean())
        q, a = req["locality"]["neighborhood"]["prompt"], req["locality"]["neighborhood"]["ground_truth"]
        pred, _ = _answer_tokens(lm, tok, q, a, ins)
        unedited, _ = _answer_tokens(base, tok, q, a, None)
        loc += float((pred == unedited).float().mean())
    n = len(requests)
    return {"Rel": 100 * rel / n, "Gen": 100 * gen / n, "Loc": 100 * loc / n}
