"""Tests for the dataset loaders against the real shared data and hand-made broken files.

Every file of the shared data README is loaded in full: its record count must
equal the README's, its format must be guessed right, and one known record is
checked field by field with exact strings. Schema errors are provoked with tiny
temporary files.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from instructedit_plugin.data import (
    FORMATS,
    LOADERS,
    MQuAKECase,
    guess_format,
    load_mquake,
    load_requests,
    load_task_description_file,
    load_task_descriptions,
    read_records,
    resolve_data_dir,
)
from instructedit_plugin.data.guess import KEY_RULES, NAME_RULES, format_from_keys
from instructedit_plugin.data.paths import DATA_DIR_ENV
from instructedit_plugin.errors import DataSchemaError, PluginError

# file (relative to shared/data) -> (README record count, expected format)
FILES: dict[str, tuple[int, str]] = {
    "zsre/zsre_mend_eval_portability_gpt4.json": (1037, "zsre_mend"),
    "zsre/ZsRE-test-all.json": (1304, "knowedit"),
    "counterfact/counterfact_portability_gpt4.json": (1031, "counterfact_rome"),
    "counterfact/train_cf.json": (1428, "knowedit"),
    "counterfact/test_cf-generate-10.jsonl": (885, "knowedit"),
    "counterfact/counterfact-train.json": (10000, "counterfact_mend"),
    "counterfact/counterfact-val.json": (1919, "counterfact_mend"),
    "counterfact/counterfact-edit.json": (10000, "counterfact_mend"),
    "recent/recent_train.json": (570, "knowedit"),
    "convsent/blender_test.json": (800, "convsent"),
    "convsent/blender_val.json": (799, "convsent"),
    "mquake/MQuAKE-hard.json": (429, "mquake"),
    "instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_ins.json": (1037, "zsre_mend_ins"),
    "instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json": (1031, "counterfact_rome_ins"),
    "instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_dec.jsonl": (1036, "zsre_mend_dec"),
    "instructed/portability/Subject_Replace/zsre_subject_replace.json": (293, "zsre_subject_replace"),
    "instructed/portability/Subject_Replace/counterfact_subject_replace.json": (213, "counterfact_subject_replace"),
    "instructed/portability/Inverse_Relation/zsre_inverse_relation.json": (385, "zsre_inverse_relation"),
}

# Instruction libraries, not edit records: file -> README count (descriptions in all tasks together).
# They are read with load_task_descriptions, never with load_requests.
INSTRUCTION_FILES: dict[str, int] = {
    "instructedit/easyedit_task_descriptions.json": 40,
}
TASK_DESCRIPTIONS = "instructedit/easyedit_task_descriptions.json"

SPONGEBOB = "nq question: what is the name of the last episode of spongebob"
IAAF_Q = "When was the inception of IAAF Combined Events Challenge?"
IAAF_NEW_Q = "What type of sports event is the IAAF Combined Events Challenge, which was established in 2006?"
SPIKE_NEIGHBORS = [
    "Max Mosley originates from", "William Hogarth originated from", "William Huggins originates from",
    "Quintin Hogg, Baron Hailsham of St Marylebone originates from", "E. Phillips Oppenheim is native to",
    "Lita Ford was native to", "William Henry Perkin was born in", "Kathryn Newton was born in",
    "Kathryn Newton was native to", "Aubrey de Grey is originally from",
]
SPIKE_PARAPHRASES = [
    "Incumbent Mayor Jim Suttle sought a second term in office. Spike Hughes is native to",
    "Amateur Athletic Union (AAU). Spike Hughes was born in",
]
SPIKE_COMMON: dict[str, Any] = {
    "case_id": 4482,
    "pararel_idx": 14235,
    "relation_id": "P19",
    "prompt": "Spike Hughes originates from",
    "subject": "Spike Hughes",
    "target_new": "Philadelphia",
    "ground_truth": "London",
    "rephrase_prompt": SPIKE_PARAPHRASES[0],
    "paraphrase_prompts": SPIKE_PARAPHRASES,
    "locality": {"neighborhood": {"prompt": SPIKE_NEIGHBORS, "ground_truth": ["London"] * 10}},
    "portability": {"one_hop": {
        "prompt": "What famous food is associated with the city where Spike Hughes originates from?",
        "ground_truth": "Cheesesteaks",
    }},
    "recalled_relation": "(Philadelphia, known for, cheesesteaks)",
}
IAAF_COMMON: dict[str, Any] = {
    "prompt": IAAF_Q,
    "subject": "IAAF Combined Events Challenge",
    "target_new": "2006",
    "ground_truth": "1998",
    "ground_truth_aliases": ["1998"],
    "rephrase_prompt": "When was the IAAF Combined Events Challenge launched?",
    "cond": f"2011 >> 2006 || {IAAF_Q}",
    "pred": "2011",
    "locality": {"nq": {"prompt": SPONGEBOB, "ground_truth": "The String"}},
    "portability": {"one_hop": {"prompt": IAAF_NEW_Q, "ground_truth": "Athletics"}},
    "recalled_relation": "(IAAF Combined Events Challenge, event type, athletics)",
}

# (file, record index, expected fields: every listed key must match exactly)
KNOWN: list[tuple[str, int, dict[str, Any]]] = [
    ("zsre/zsre_mend_eval_portability_gpt4.json", 0, IAAF_COMMON),
    ("instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_ins.json", 0, {
        **IAAF_COMMON, "instruction": "When was the inception of IAAF Combined Events Challenge? 2006.",
    }),
    ("instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_dec.jsonl", 0, {
        **IAAF_COMMON,
        "questions_dec": ["The inception of IAAF Combined Events Challenge was in [MASK]."],
    }),
    ("zsre/ZsRE-test-all.json", 0, {
        "subject": "Epaspidoceras",
        "prompt": "Which family does Epaspidoceras belong to?",
        "target_new": "Noctuidae",
        "ground_truth": "Aspidoceratidae",
        "ground_truth_aliases": ["Aspidoceratidae"],
        "rephrase_prompt": "What family are Epaspidoceras?",
        "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
        "locality": {"Relation_Specificity": {
            "prompt": ["The taxon rank of Epaspidoceras is", "Epaspidoceras taxon rank"],
            "ground_truth": ["genus", "genus"],
            "ground_truth_aliases": [["genus"], ["genus"]],
        }},
        "portability": {"Reasoning": {
            "prompt": ["What is the common name for the family Epaspidoceras belongs to?"],
            "ground_truth": ["Owlet moths"],
            "ground_truth_aliases": [["Owlet moths"]],
        }},
    }),
    ("zsre/ZsRE-test-all.json", 1303, {
        "subject": "Another Mother Further",
        "prompt": "What is the name of the performer that released the album Another Mother Further?",
        "target_new": "Cher",
        "ground_truth": "Mother's Finest",
        "rephrase_prompt": "What's the name of the performer that released the album Another Mother Further?",
    }),
    ("counterfact/counterfact_portability_gpt4.json", 0, SPIKE_COMMON),
    ("instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json", 0, {
        **SPIKE_COMMON, "instruction": "Spike Hughes originates from Philadelphia.",
    }),
    ("counterfact/train_cf.json", 0, {
        "subject": "Goursez Vreizh",
        "prompt": "The name of the country which Goursez Vreizh is associated with is",
        "target_new": "Franche-Comté",
        "ground_truth": "France",
        "locality": {"Relation_Specificity": {
            "prompt": ["The name of the founder of Goursez Vreizh is"],
            "ground_truth": ["Jean Le Fustec"],
            "ground_truth_aliases": [["Jean Le Fustec"]],
        }},
        "portability": {
            "Reasoning": {
                "prompt": ["The name of the capital city of the country Goursez Vreizh is associated with is"],
                "ground_truth": ["Besançon"],
                "ground_truth_aliases": [["Besançon"]],
            },
            "Subject_Aliasing": {
                "prompt": ["The name of the country which Gorsedd of Brittany is associated with is"],
                "ground_truth": ["Franche-Comté"],
                "ground_truth_aliases": [["Franche-Comté"]],
            },
        },
    }),
    ("counterfact/test_cf-generate-10.jsonl", 0, {
        "subject": "Leonardo DiCaprio",
        "prompt": "The name of the country of citizenship of Leonardo DiCaprio is",
        "target_new": "Syria",
        "ground_truth": "United States of America",
    }),
    ("counterfact/counterfact-train.json", 9999, {
        "case_id": 21912,
        "prompt": "Christian Wilhelm Blomstrand's area of work is",
        "target_new": "sociology",
        "subject": "Christian Wilhelm Blomstrand",
        "ground_truth": "chemistry",
        "rephrase_prompt": "Christian Wilhelm Blomstrand works as a",
        "locality": {"neighborhood": {"prompt": "The expertise of Michael Faraday is", "ground_truth": "chemistry"}},
        "portability": {},
    }),
    ("counterfact/counterfact-val.json", 0, {
        "case_id": 10,
        "prompt": "BBC One, by",
        "target_new": "Sega",
        "subject": "BBC One",
        "ground_truth": "BBC",
        "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
        "locality": {"neighborhood": {"prompt": "BBC Radio, by", "ground_truth": "BBC"}},
    }),
    ("counterfact/counterfact-edit.json", 0, {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality": {"neighborhood": {"prompt": "Michel Rocard is a native speaker of", "ground_truth": "French"}},
    }),
    ("recent/recent_train.json", 0, {
        "subject": "Ingrīda Amantova",
        "prompt": "The gender of Ingrīda Amantova is",
        "target_new": "female",
        "ground_truth": "",
        "portability": {},
    }),
    ("convsent/blender_test.json", 0, {
        "topic": "Estero",
        "subject": "Estero",
        "prompt": "What do you think of Estero?",
        "target_new": "I really like his style.",
        "ground_truth": "",
        "locality": {},
        "portability": {},
    }),
    ("convsent/blender_test.json", 799, {
        "topic": "Aarhus", "prompt": "What do you think of Aarhus?",
    }),
    ("convsent/blender_val.json", 0, {
        "topic": "Esparto, California",
        "prompt": "What do you think of Esparto, California?",
        "target_new": "I know it's not the most exciting of places, but I think it has a nice vibe to it.",
    }),
    ("instructed/portability/Subject_Replace/zsre_subject_replace.json", 0, {
        "subject": "NGC 3953",
        "prompt": "Which was the constellation for NGC 3953?",
        "target_new": "Triangulum",
        "ground_truth": "Ursa Major",
        "rephrase_prompt": "Which one was the constellation of NGC 3953?",
        "alternative_subject": "UGC 6870",
        "locality": {},
        "portability": {"subject_replace": {
            "prompt": "What is the constellation of UGC 6870?", "ground_truth": "Triangulum",
        }},
    }),
    ("instructed/portability/Subject_Replace/counterfact_subject_replace.json", 0, {
        "case_id": 4496,
        "subject": "May Wright Sewall",
        "prompt": "May Wright Sewall passed away in",
        "target_new": "Birmingham",
        "ground_truth": "Indianapolis",
        "alternative_subject": "Mary Eliza Wright",
        "portability": {"subject_replace": {
            "prompt": "Mary Eliza Wright passed away in", "ground_truth": "Birmingham",
        }},
    }),
    ("instructed/portability/Inverse_Relation/zsre_inverse_relation.json", 0, {
        "subject": "Claire Clairmont",
        "prompt": "Who is Claire Clairmont's sister?",
        "target_new": "Marian Clairmont",
        "ground_truth": "Mary Shelley",
        "rephrase_prompt": "Who's Claire Clairmont's sister?",
        "locality": {},
        "portability": {"inverse_relation": {
            "prompt": "Who is Marian Clairmont's sister?", "ground_truth": "Claire Clairmont",
        }},
    }),
    ("mquake/MQuAKE-hard.json", 0, {
        "case_id": 7417,
        "prompt": "Hey Jude was performed by",
        "subject": "Hey Jude",
        "target_new": "Madonna",
        "ground_truth": "The Beatles",
        "question": "Who performed Hey Jude?",
        "relation_id": "P175",
    }),
]

REQUIRED_REQUEST_KEYS = {"prompt": str, "target_new": str, "ground_truth": str, "subject": str,
                         "locality": dict, "portability": dict}


@functools.lru_cache(maxsize=None)
def _requests(path: Path) -> list[dict[str, Any]]:
    return load_requests(path)


def _write(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _good_mend_record(case_id: int = 1) -> dict[str, Any]:
    return {
        "case_id": case_id, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
        "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar",
    }


# ---------------------------------------------------------------------------- real files


def test_readme_table_is_covered(shared_data_dir: Path) -> None:
    readme = (shared_data_dir / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| (\d+) \|", readme, flags=re.M)
    documented = {name: count for name, (count, _) in FILES.items()} | INSTRUCTION_FILES
    assert {name: int(count) for name, count in rows} == documented
    on_disk = {p.relative_to(shared_data_dir).as_posix() for p in shared_data_dir.rglob("*.json*")}
    assert on_disk == set(FILES) | set(INSTRUCTION_FILES)
    assert not set(FILES) & set(INSTRUCTION_FILES)


@pytest.mark.parametrize("relpath", sorted(FILES))
def test_record_count_and_format(shared_data_dir: Path, relpath: str) -> None:
    count, fmt = FILES[relpath]
    path = shared_data_dir / relpath
    assert guess_format(path) == fmt
    if fmt == "mquake":
        cases = load_mquake(path)
        assert len(cases) == count
        assert len(_requests(path)) == sum(len(case.edits) for case in cases)
    else:
        assert len(_requests(path)) == count


@pytest.mark.parametrize("relpath", sorted(FILES))
def test_every_request_has_easyedit_shape(shared_data_dir: Path, relpath: str) -> None:
    for request in _requests(shared_data_dir / relpath):
        for key, typ in REQUIRED_REQUEST_KEYS.items():
            assert isinstance(request[key], typ), (key, request)
        assert isinstance(request.get("rephrase_prompt", ""), str)
        for section in ("locality", "portability"):
            for entry in request[section].values():
                prompt, answer = entry["prompt"], entry["ground_truth"]
                if isinstance(prompt, list):
                    assert prompt and len(prompt) == len(answer)
                    assert all(isinstance(x, str) and x for x in answer)
                else:
                    assert isinstance(prompt, str) and isinstance(answer, str)


@pytest.mark.parametrize(("relpath", "index", "expected"), KNOWN, ids=[f"{f}#{i}" for f, i, _ in KNOWN])
def test_known_record(shared_data_dir: Path, relpath: str, index: int, expected: dict[str, Any]) -> None:
    request = _requests(shared_data_dir / relpath)[index]
    assert {key: request.get(key, "<absent>") for key in expected} == expected


def test_convsent_keeps_raw_responses(shared_data_dir: Path) -> None:
    request = _requests(shared_data_dir / "convsent/blender_test.json")[0]
    assert request["pos"][0] == " I really like his style. "
    assert request["neg"][0] == " Well, it has some bad reviews on Glass Door. "
    assert len(request["pos"]) == 11


def test_knowedit_alias_lists_are_flattened(shared_data_dir: Path) -> None:
    request = _requests(shared_data_dir / "counterfact/test_cf-generate-10.jsonl")[0]
    rel = request["locality"]["Relation_Specificity"]
    assert rel["prompt"][0] == "The name of the mother of Leonardo DiCaprio is"
    assert rel["ground_truth"][0] == "Irmelin DiCaprio"
    assert rel["ground_truth_aliases"][0] == ["Irmelin DiCaprio", "Irmelin Indenbirken", "Irmelin Indenbirken-DiCaprio"]
    reasoning = request["portability"]["Reasoning"]
    assert reasoning["prompt"][0] == "The name of the currency in the country of citizenship of Leonardo DiCaprio is"
    assert reasoning["ground_truth"][0] == "Syrian pound"
    assert reasoning["ground_truth_aliases"][0] == ["Syrian pound", "SYP", "LS", "Syrian lira"]
    assert set(request["portability"]) == {"Reasoning", "Subject_Aliasing"}
    assert len(request["generate_prompts"]) == 10
    assert "rephrase_prompt" not in request


def test_knowedit_drops_answerless_items(shared_data_dir: Path) -> None:
    # test_cf record 14 has a Logical_Generalization item whose answer is [[]].
    raw = read_records(shared_data_dir / "counterfact/test_cf-generate-10.jsonl", limit=15)[14]
    raw_items = raw["portability"]["Logical_Generalization"]
    assert {"prompt": "The name of the father of Shiban is", "ground_truth": [[]]} in raw_items
    logical = _requests(shared_data_dir / "counterfact/test_cf-generate-10.jsonl")[14]["portability"][
        "Logical_Generalization"]
    assert "The name of the father of Shiban is" not in logical["prompt"]
    assert len(logical["prompt"]) == len(raw_items) - 1
    assert logical["ground_truth"][0] == "Shiban"
    # recent_train record 138: "position held" answer is [[], []]; a multi-answer item keeps every alias.
    rel = _requests(shared_data_dir / "recent/recent_train.json")[138]["locality"]["Relation_Specificity"]
    assert "The name of the position held by Paul de Gerlache is" not in rel["prompt"]
    alma = rel["prompt"].index("The name of the alma mater of Paul de Gerlache is")
    assert rel["ground_truth"][alma] == "Collège Saint-Michel"
    assert "University of Liège" in rel["ground_truth_aliases"][alma]


def test_mquake_case_fields(shared_data_dir: Path) -> None:
    case = load_mquake(shared_data_dir / "mquake/MQuAKE-hard.json", limit=1)[0]
    assert isinstance(case, MQuAKECase)
    assert case.case_id == 7417
    assert case.answer == "English"
    assert case.new_answer == "Arabic"
    assert len(case.edits) == 4 and len(case.questions) == 3
    assert case.questions[0].startswith("What is the official language of the country of citizensh")
    assert case.edits[1]["prompt"] == "The director of Madonna is"
    assert case.edits[1]["target_new"] == "Narendra Modi"
    assert case.edits[1]["question"] == "Who is the director of Madonna?"
    hop = case.single_hops[0]
    assert (hop.question, hop.cloze, hop.answer) == (
        "Who performed Hey Jude?", "Hey Jude was performed by", "The Beatles")
    assert hop.answer_alias[0] == "Beatles"
    assert all(isinstance(h.answer, str) for h in case.new_single_hops)
    assert set(case.orig) >= {"triples", "new_triples", "edit_triples"}


@pytest.mark.parametrize("relpath", [
    "counterfact/counterfact-train.json", "counterfact/test_cf-generate-10.jsonl", "mquake/MQuAKE-hard.json",
])
def test_limit_reads_first_records(shared_data_dir: Path, relpath: str) -> None:
    path = shared_data_dir / relpath
    if FILES[relpath][1] == "mquake":
        assert [c.case_id for c in load_mquake(path, limit=2)] == [c.case_id for c in load_mquake(path)[:2]]
        return
    assert load_requests(path, limit=3) == _requests(path)[:3]
    assert load_requests(path, limit=0) == []


# ---------------------------------------------------------------------------- task descriptions


@pytest.mark.parametrize("relpath", sorted(INSTRUCTION_FILES))
def test_instruction_file_count_matches_readme(shared_data_dir: Path, relpath: str) -> None:
    tasks = load_task_descriptions(shared_data_dir / relpath)
    assert sum(len(descriptions) for descriptions in tasks.values()) == INSTRUCTION_FILES[relpath]


def test_task_descriptions_real_file(shared_data_dir: Path) -> None:
    path = shared_data_dir / TASK_DESCRIPTIONS
    tasks = load_task_descriptions(path)
    assert list(tasks) == ["convsent", "counterfact", "wikirecent", "zsre"]
    assert {task: len(descriptions) for task, descriptions in tasks.items()} == dict.fromkeys(tasks, 10)
    assert all(isinstance(d, str) and d.strip() for descriptions in tasks.values() for d in descriptions)
    assert all(len(set(descriptions)) == 10 for descriptions in tasks.values())
    assert tasks["convsent"][0] == ("Teach the chatbot to sound [LABEL] when talking about [TOPIC], "
                                    "but keep its cool on everything else.")
    assert tasks["counterfact"][1] == ("A test set for measuring how well models can identify and deal with "
                                       "less common or 'tail' entities.")
    assert tasks["wikirecent"][0] == "A curated collection of the latest factual relationships added to WikiData."
    assert tasks["zsre"][9] == ("A dataset for driving the development of AI that can predict objects given a "
                                "subject and its relation.")
    assert all("[LABEL]" in d and "[TOPIC]" in d for d in tasks["convsent"])

    library = load_task_description_file(path)
    assert library.tasks == tasks and library.held_out_index == 9
    assert library.template == "Task: {}\nDescription: {}\nInput: {}"
    assert library.template.format("zsre", "d", "p") == "Task: zsre\nDescription: d\nInput: p"
    assert set(library.placeholders) == {"[LABEL]", "[TOPIC]"}
    for task, descriptions in tasks.items():
        assert library.seen(task) == descriptions[:9] and library.unseen(task) == [descriptions[9]]


def test_task_descriptions_file_is_not_edit_records(shared_data_dir: Path) -> None:
    with pytest.raises(PluginError, match=r"instruction library.*Fix: read it with .*load_task_descriptions"):
        load_requests(shared_data_dir / TASK_DESCRIPTIONS)
    with pytest.raises(PluginError, match="load_task_descriptions"):
        load_requests(shared_data_dir / TASK_DESCRIPTIONS, fmt="knowedit")


def _good_descriptions() -> dict[str, Any]:
    return {"template": "Task: {}\nDescription: {}\nInput: {}", "held_out_index": 1,
            "tasks": {"zsre": ["Answer questions.", "Relations to objects."], "counterfact": ["Tail entities.", "Rare."]}}


def _del(key: str):
    return lambda data: data.pop(key)


def _put(*keys_and_value: Any):
    *keys, value = keys_and_value

    def mutate(data: dict[str, Any]) -> None:
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


@pytest.mark.parametrize(("mutate", "key", "problem"), [
    (_del("tasks"), "tasks", "missing required key"),
    (_put("tasks", []), "tasks", "got list"),
    (_put("tasks", {}), "tasks", "got an empty object"),
    (_put("tasks", "zsre", "Answer questions."), "tasks.zsre", "got str"),
    (_put("tasks", "zsre", []), "tasks.zsre", "got an empty list"),
    (_put("tasks", "zsre", 1, 7), "tasks.zsre[1]", "got int"),
    (_put("tasks", "zsre", 1, "  "), "tasks.zsre[1]", "got an empty string"),
    (_put("tasks", "zsre", 1, "Answer questions."), "tasks.zsre[1]", "duplicates an earlier description"),
    (_put("held_out_index", 2), "held_out_index", "2 is out of range"),
    (_put("held_out_index", "9"), "held_out_index", "expected an integer or null, got str"),
    (_put("held_out_index", True), "held_out_index", "got bool"),
    (_put("template", "Task: {}\nInput: {}"), "template", "has 2 '{}' field(s), needs 3"),
    (_put("placeholders", ["[TOPIC]"]), "placeholders", "got list"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_task_descriptions_schema_errors(tmp_path: Path, mutate: Any, key: str, problem: str) -> None:
    data = _good_descriptions()
    assert load_task_descriptions(_write(tmp_path / "task_descriptions.json", data))["zsre"][1] == "Relations to objects."
    mutate(data)
    path = _write(tmp_path / "task_descriptions.json", data)
    with pytest.raises(DataSchemaError) as info:
        load_task_descriptions(path)
    err = info.value
    assert (err.path, err.index, err.key) == (str(path), None, key)
    assert problem in err.problem
    message = str(err)
    assert message.startswith(f"{path}: file: key '{key}': ") and "Fix: " in message
    assert not message.rstrip().endswith("Fix:")


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('[{"zsre": ["a"]}]', "<root>", "expected a JSON object with a 'tasks' key, found list"),
    ('{"tasks": {"zsre": ["a",]}}', "<json>", "invalid JSON at line 1 column"),
    ("", "<json>", "invalid JSON at line 1 column 1"),
])
def test_task_descriptions_file_level_errors(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = tmp_path / "descriptions.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataSchemaError) as info:
        load_task_descriptions(path)
    assert (info.value.key, info.value.index) == (key, None) and problem in info.value.problem
    assert str(path) in str(info.value) and "Fix: " in str(info.value)


def test_task_descriptions_missing_or_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist. Fix: "):
        load_task_descriptions(tmp_path / "nope.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('{"tasks": {"zsre": ["caf\u00e9"]}}'.encode("latin-1"))
    with pytest.raises(DataSchemaError, match="not UTF-8 text.*Fix: convert it to UTF-8"):
        load_task_descriptions(path)


def test_task_descriptions_without_optional_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.json", {"tasks": {"poetry": ["Write verse."]}})
    library = load_task_description_file(path)
    assert library.tasks == {"poetry": ["Write verse."]}
    assert (library.template, library.held_out_index, library.placeholders) == (None, None, {})
    assert library.seen("poetry") == ["Write verse."] and library.unseen("poetry") == []


# ---------------------------------------------------------------------------- format guessing


@pytest.mark.parametrize("relpath", sorted(FILES))
def test_guess_by_keys_when_renamed(shared_data_dir: Path, tmp_path: Path, relpath: str) -> None:
    first = read_records(shared_data_dir / relpath, limit=1)
    renamed = _write(tmp_path / "renamed.json", first)
    assert guess_format(renamed) == FILES[relpath][1]
    assert len(load_requests(renamed)) >= 1


def test_guess_rules_cover_every_format() -> None:
    assert isinstance(LOADERS, dict)
    assert {fmt for _, fmt in NAME_RULES} == set(FORMATS)
    assert {fmt for _, fmt in KEY_RULES} == set(FORMATS)
    assert format_from_keys(["not", "a", "dict"]) is None


def test_guess_unknown_format_fails_clearly(tmp_path: Path) -> None:
    path = _write(tmp_path / "mystery.json", [{"foo": 1}])
    with pytest.raises(PluginError, match="fmt="):
        guess_format(path)
    with pytest.raises(PluginError, match="unknown dataset format 'nope'"):
        load_requests(path, fmt="nope")


def test_explicit_format_overrides_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "blender_misnamed.json", [_good_mend_record()])
    assert guess_format(path) == "convsent"
    assert load_requests(path, fmt="counterfact_mend")[0]["target_new"] == "piano"


def test_json_lines_under_json_name(tmp_path: Path) -> None:
    path = tmp_path / "counterfact-val.json"
    path.write_text("\n".join(json.dumps(_good_mend_record(i)) for i in range(3)) + "\n", encoding="utf-8")
    assert [r["case_id"] for r in load_requests(path)] == [0, 1, 2]


# ---------------------------------------------------------------------------- schema errors


def _schema_error(path: Path, fmt: str | None = None) -> DataSchemaError:
    with pytest.raises(DataSchemaError) as info:
        load_requests(path, fmt=fmt)
    return info.value


def test_missing_key_names_file_record_and_key(tmp_path: Path) -> None:
    bad = _good_mend_record(2)
    del bad["target_new"]
    path = _write(tmp_path / "counterfact-train.json", [_good_mend_record(), bad])
    err = _schema_error(path)
    assert "counterfact-train.json" in str(err) and "record 1" in str(err) and "target_new" in str(err)
    assert (err.index, err.key) == (1, "target_new")
    assert "missing" in err.problem


def test_wrong_type_names_file_record_and_key(tmp_path: Path) -> None:
    bad = {**_good_mend_record(2), "prompt": 42}
    path = _write(tmp_path / "counterfact-train.json", [_good_mend_record(), bad])
    err = _schema_error(path)
    assert "counterfact-train.json" in str(err) and "record 1" in str(err) and "'prompt'" in str(err)
    assert "expected str, got int" in str(err)


def test_nested_key_path_in_error(tmp_path: Path, shared_data_dir: Path) -> None:
    records = read_records(shared_data_dir / "counterfact/counterfact_portability_gpt4.json", limit=2)
    records[1]["requested_rewrite"]["target_new"] = {"id": "Q1"}
    err = _schema_error(_write(tmp_path / "counterfact_portability_x.json", records))
    assert (err.index, err.key) == (1, "requested_rewrite.target_new.str")
    records[1]["requested_rewrite"] = {**records[0]["requested_rewrite"], "prompt": "no placeholder"}
    err = _schema_error(_write(tmp_path / "counterfact_portability_x.json", records))
    assert err.key == "requested_rewrite.prompt" and "placeholder" in err.problem


def test_knowedit_item_type_error(tmp_path: Path) -> None:
    record = {"subject": "s", "prompt": "p", "target_new": "t", "ground_truth": "g",
              "locality": {"Forgetfulness": [{"prompt": "q", "ground_truth": 3}]}}
    err = _schema_error(_write(tmp_path / "train_cf.json", [record]))
    assert err.index == 0 and err.key == "locality.Forgetfulness[0].ground_truth"


def test_instructed_variant_requires_its_field(tmp_path: Path, shared_data_dir: Path) -> None:
    records = read_records(shared_data_dir / "zsre/zsre_mend_eval_portability_gpt4.json", limit=2)
    err = _schema_error(_write(tmp_path / "zsre_mend_eval_portability_gpt4_ins.json", records))
    assert (err.index, err.key) == (0, "ins")


def test_record_not_an_object(tmp_path: Path) -> None:
    err = _schema_error(_write(tmp_path / "blender_test.json", [{"ent": "x", "pos": ["a"], "neg": []}, "oops"]))
    assert err.index == 1 and "expected an object, got str" in str(err)


def test_invalid_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "counterfact-edit.json"
    path.write_text('[{"case_id": 1,}]', encoding="utf-8")
    err = _schema_error(path)
    assert "counterfact-edit.json" in str(err) and "invalid JSON at line 1" in str(err)
    path.write_text("", encoding="utf-8")
    assert "expected a JSON array" in str(_schema_error(path))
    path.write_text(json.dumps([_good_mend_record()]) + " trailing", encoding="utf-8")
    assert "extra data" in str(_schema_error(path))


def test_invalid_json_lines_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "test_cf-x.jsonl"
    path.write_text('{"subject": "s", "prompt": "p", "target_new": "t"}\n\n{broken\n', encoding="utf-8")
    err = _schema_error(path)
    assert "test_cf-x.jsonl" in str(err) and "record 1" in str(err) and "line 3" in str(err)


def test_limit_stops_before_broken_records(tmp_path: Path) -> None:
    path = tmp_path / "counterfact-edit.json"
    good = json.dumps([_good_mend_record(0), _good_mend_record(1)])
    path.write_text(good[:-1] + ', {"case_id": ', encoding="utf-8")  # record 2 is cut off
    assert len(load_requests(path, limit=2)) == 2
    assert _schema_error(path).index == 2
    with pytest.raises(PluginError, match="limit"):
        load_requests(path, limit=-1)


# ---------------------------------------------------------------------------- data dir


def test_resolve_data_dir_argument_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, "/from/env")
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path


def test_resolve_data_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path


def test_resolve_data_dir_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(PluginError, match=f"data_dir=.*{DATA_DIR_ENV}"):
        resolve_data_dir()


def test_shared_data_dir_fixture(shared_data_dir: Path) -> None:
    assert shared_data_dir.name == "data" and shared_data_dir.parent.name == "shared"
    assert (shared_data_dir / "README.md").is_file()
