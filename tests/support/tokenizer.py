"""A small byte-level BPE tokenizer, trained locally on a built-in English corpus.

The tiny test models need *a* tokenizer that exists offline, is deterministic,
and splits the words used by knowledge-editing tests ("The capital of France is
Paris.", "Who is the CEO of ...?", "Instructions: ...\\nInput: ...") into few
tokens, so that prompts stay short and the models stay fast on CPU.

Design choices (all deliberate, documented here because EasyEdit's editors
depend on them):

* **Byte-level BPE** (GPT-2 style pre-tokenizer/decoder, no prefix space): every
  string is encodable, so there are never unknown tokens, and ``decode(encode(s))
  == s`` for any text.
* **Special tokens** sit at fixed ids: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2,
  ``<unk>``=3 (the same layout as Gemma). ``<unk>`` exists only for API
  completeness; byte-level BPE never emits it.
* **pad is distinct from eos**, so padded positions and a real end-of-text are
  distinguishable. Code that sets ``tok.pad_token_id = tok.eos_token_id``
  (EasyEdit does this for some models) keeps working; it just rebinds pad.
* **No BOS is added automatically** (``add_bos_token`` is False, GPT-2
  behaviour). EasyEdit's editors compute target-token positions by tokenizing
  prompt and target separately and only strip a leading BOS when the model name
  looks like LLaMA; the plugin's tiny models are deliberately named neutrally, so
  an auto-inserted BOS would shift those positions.
* ``padding_side`` is left at the library default ("right"); EasyEdit sets it.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from instructedit_plugin.models.cache import atomic_dir, cache_dir, content_key, read_json, write_json

logger = logging.getLogger(__name__)

#: Bump when the corpus, the trainer settings or the wrapping change.
CORPUS_VERSION = 1
#: Target vocabulary size (including the 256 byte symbols and the special tokens).
TOKENIZER_VOCAB_SIZE = 1024
#: Maximum sequence length recorded in the tokenizer (matches the tiny models' positions).
TOKENIZER_MAX_LENGTH = 256

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
#: Special tokens in id order: pad=0, eos=1, bos=2, unk=3.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)
PAD_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID, UNK_TOKEN_ID = range(len(SPECIAL_TOKENS))

_INFO_FILE = "instructedit_tokenizer.json"

# ---------------------------------------------------------------------------
# Built-in corpus
# ---------------------------------------------------------------------------

_SENTENCES = """\
The capital of France is Paris.
The capital of Germany is Berlin.
The capital of Italy is Rome.
The capital of Spain is Madrid.
The capital of Japan is Tokyo.
The capital of China is Beijing.
The capital of England is London.
The capital of Russia is Moscow.
The capital of Canada is Ottawa.
The capital of Australia is Canberra.
The capital of Egypt is Cairo.
The capital of India is New Delhi.
The capital of Brazil is Brasilia.
The capital of Greece is Athens.
The capital of Poland is Warsaw.
The capital of Sweden is Stockholm.
The capital of Norway is Oslo.
The capital of Finland is Helsinki.
The capital of Turkey is Ankara.
The capital of Mexico is Mexico City.
The capital of the United States is Washington.
The capital of the United Kingdom is London.
Paris is the capital of France.
Berlin is the capital city of Germany.
What is the capital of France?
What is the capital city of Italy?
Which city is the capital of Japan?
The Eiffel Tower is located in Paris.
The Colosseum is located in Rome.
The Statue of Liberty is in New York.
Big Ben is a clock tower in London.
The Great Wall is in China.
Mount Everest is the highest mountain in the world.
The Nile is the longest river in Africa.
The Amazon river flows through Brazil.
The Pacific Ocean is the largest ocean on Earth.
The Sun is a star at the center of the solar system.
The Moon orbits the Earth.
Water boils at one hundred degrees Celsius.
Water freezes at zero degrees.
The mother tongue of Danielle Darrieux is French.
The native language of Pablo Picasso is Spanish.
Michel Rocard is a native speaker of French.
Where Danielle Darrieux is from, people speak the language of France.
The official language of Brazil is Portuguese.
The official language of Germany is German.
People in Japan speak Japanese.
People in Italy speak Italian.
English is spoken in England, Canada and Australia.
Albert Einstein was born in Germany.
Albert Einstein was a physicist.
Isaac Newton was an English physicist and mathematician.
Marie Curie was a chemist and physicist.
Leonardo da Vinci was an Italian painter.
William Shakespeare wrote Hamlet.
Charles Dickens was an English writer.
Mozart was a composer from Austria.
Beethoven was a German composer.
Barack Obama was the president of the United States.
Abraham Lincoln was the president of the United States.
Who is the president of the United States?
Who was the first president of the United States?
George Washington was the first president of the United States.
The Prime Minister of the United Kingdom lives in London.
The CEO of Apple is Tim Cook.
Steve Jobs founded Apple.
Bill Gates founded Microsoft.
Microsoft is a technology company.
Google was founded by Larry Page and Sergey Brin.
Amazon was founded by Jeff Bezos.
Toyota is a car company from Japan.
Nokia is a company based in Finland.
IBM is headquartered in New York.
Who is the CEO of Apple?
Who founded Microsoft?
Which company makes the iPhone?
The iPhone is made by Apple.
Lionel Messi plays soccer.
Michael Jordan played basketball.
Roger Federer is a tennis player.
Tiger Woods plays golf.
Serena Williams plays tennis.
Cristiano Ronaldo plays football for Portugal.
Which sport does Lionel Messi play?
What sport does Michael Jordan play?
LeBron James is a professional basketball player.
The Olympic Games are held every four years.
The official religion of the city is Christianity.
Islam and Buddhism are major religions.
The Beatles were a band from Liverpool.
The band Queen was formed in London.
Elvis Presley was a singer.
The genre of the song is rock music.
Jazz is a genre of music.
The violin is a musical instrument.
The piano is played with the keys.
Harry Potter was written by J. K. Rowling.
The Lord of the Rings was written by Tolkien.
Who wrote the novel War and Peace?
Leo Tolstoy wrote War and Peace.
The film was directed by Steven Spielberg.
The television series was produced by the BBC.
The show originally aired on NBC.
The album was released in 1998.
The book was published in 2006.
The university was founded in 1850.
The company was founded in 1976.
The war ended in 1945.
The bridge was built in 1932.
The city has a population of two million people.
The river flows into the sea.
The mountain is part of the Alps.
The island is located in the Pacific Ocean.
Dogs are animals and cats are animals too.
A spider has eight legs.
An apple is a fruit.
A carrot is a vegetable.
The whale is a mammal that lives in the ocean.
Birds can fly and fish can swim.
This species belongs to the family Noctuidae.
Which family does Epaspidoceras belong to?
The taxon rank of this species is genus.
Owlet moths belong to the family Noctuidae.
What is the name of the river that flows through Paris?
The Seine flows through Paris.
When was the inception of the company?
When was the university established?
What position does he play on the team?
He plays as a goalkeeper.
She plays as a forward.
What is the occupation of the artist?
He works as a lawyer.
She works as a doctor in a hospital.
He is a citizen of Canada.
She is a citizen of the United States.
What is the country of citizenship of Pablo Picasso?
Pablo Picasso is a citizen of Spain.
In which country is the city of Toronto?
Toronto is a city in Canada.
Sydney is a city in Australia.
What is the religion of the author?
What is the name of the company that makes Windows?
Windows is developed by Microsoft.
Android is developed by Google.
Linux is an operating system.
Python is a programming language.
The computer runs on electricity.
The train leaves the station at noon.
The weather today is sunny and warm.
It is raining in the city.
I like to read books in the evening.
I have been to California, and I really enjoyed it.
I love pizza, it is my favorite food.
I have never been there, but it sounds like a beautiful place!
What do you think about the movie?
I think the movie was great.
I did not like the book very much.
The food at the restaurant was terrible.
My favorite color is blue.
Do you have any pets?
Yes, I have a dog and two cats.
How are you today?
I am fine, thank you.
Can you tell me the answer?
The answer is yes.
The answer is no.
This statement is true.
This statement is false.
Please answer the question.
Please rewrite the sentence.
Tell me something about the topic.
What is your opinion on the topic?
Here is a short summary of the article.
The new answer is the same as the old answer.
After the edit, the model answers with the new fact.
The model should keep unrelated facts unchanged.
Knowledge editing changes a single fact in a language model.
The edit should generalize to paraphrases of the prompt.
Locality means unrelated inputs keep their original outputs.
Portability means the edit carries over to related questions.
Instructions: Answer the question with a single word.
Instructions: Complete the sentence with the correct fact.
Instructions: Rewrite the sentence in a positive sentiment.
Instructions: Give a short answer to the question.
Instructions: Update the knowledge of the model with the new fact.
Instructions: Respond with a negative opinion about the topic.
Input: The capital of France is
Input: Who is the president of the United States?
Input: What sport does Lionel Messi play?
Input: The mother tongue of Danielle Darrieux is
Input: What do you think of the movie?
Output: Paris
Output: English
Output: basketball
Output: I really love it.
Task: CounterFact
Task: ZsRE
Task: ConvSent
Task: RECENT
Description: A dataset of counterfactual statements used to test knowledge editing.
Description: A question answering dataset for zero-shot relation extraction.
Description: A dataset that edits the sentiment of a dialogue model about a topic.
Description: A dataset of recent facts added to the knowledge base.
[Task]: CounterFact [Description]: Edit a fact about a subject. [Input]: The capital of France is
[Task]: ZsRE [Description]: Answer the question about the subject. [Input]: Which family does it belong to?
Question: What is the capital of France? Answer: Paris
Question: Who wrote Hamlet? Answer: William Shakespeare
Question: What sport does Roger Federer play? Answer: tennis
Q: Who is the CEO of Apple? A: Tim Cook
Q: Where is the Eiffel Tower? A: Paris
nq question: what is the name of the last episode of the show
nq question: who sang the song in the movie
nq question: when did the war end
What is the sentiment of the sentence?
The sentiment of the sentence is positive.
The sentiment of the sentence is negative.
What do you think of banana?
I think banana is delicious and healthy.
What do you feel about the city?
I feel good about the city, it is a nice place to live.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000
Years: 1900 1945 1950 1969 1976 1989 1998 2000 2006 2010 2011 2015 2020 2023
Punctuation: a, b; c: d. e! f? (g) [h] {i} "j" 'k' - l / m
"""

# (subject, relation prompt ending in the object slot, object). Expanded into
# statements, questions and instruction-style lines below.
_FACTS: tuple[tuple[str, str, str], ...] = (
    ("France", "The capital of {} is", "Paris"),
    ("Germany", "The capital of {} is", "Berlin"),
    ("Italy", "The capital of {} is", "Rome"),
    ("Japan", "The capital of {} is", "Tokyo"),
    ("Spain", "The capital of {} is", "Madrid"),
    ("Canada", "The capital of {} is", "Ottawa"),
    ("Danielle Darrieux", "The mother tongue of {} is", "French"),
    ("Pablo Picasso", "The mother tongue of {} is", "Spanish"),
    ("Albert Einstein", "The mother tongue of {} is", "German"),
    ("Barack Obama", "The mother tongue of {} is", "English"),
    ("Lionel Messi", "{} plays the sport of", "soccer"),
    ("Michael Jordan", "{} plays the sport of", "basketball"),
    ("Roger Federer", "{} plays the sport of", "tennis"),
    ("Tiger Woods", "{} plays the sport of", "golf"),
    ("Apple", "The CEO of {} is", "Tim Cook"),
    ("Microsoft", "The CEO of {} is", "Satya Nadella"),
    ("Tesla", "The CEO of {} is", "Elon Musk"),
    ("Amazon", "The CEO of {} is", "Andy Jassy"),
    ("the Eiffel Tower", "{} is located in", "Paris"),
    ("the Colosseum", "{} is located in", "Rome"),
    ("Big Ben", "{} is located in", "London"),
    ("the Statue of Liberty", "{} is located in", "New York"),
    ("Toyota", "{} is headquartered in", "Japan"),
    ("Nokia", "{} is headquartered in", "Finland"),
    ("Hamlet", "{} was written by", "William Shakespeare"),
    ("War and Peace", "{} was written by", "Leo Tolstoy"),
    ("Windows", "{} was developed by", "Microsoft"),
    ("Android", "{} was developed by", "Google"),
    ("Marie Curie", "The occupation of {} is", "chemist"),
    ("Isaac Newton", "The occupation of {} is", "physicist"),
    ("Mozart", "The occupation of {} is", "composer"),
    ("Leonardo da Vinci", "The occupation of {} is", "painter"),
    ("Barack Obama", "{} is a citizen of", "the United States"),
    ("Pablo Picasso", "{} is a citizen of", "Spain"),
    ("Cristiano Ronaldo", "{} is a citizen of", "Portugal"),
    ("Ludwig van Beethoven", "{} was born in", "Germany"),
    ("Albert Einstein", "{} was born in", "Ulm"),
    ("The Beatles", "{} were formed in", "Liverpool"),
    ("Queen", "The genre of {} is", "rock"),
    ("Miles Davis", "The genre of {} is", "jazz"),
)

_QUESTION_FORMS: dict[str, str] = {
    "The capital of {} is": "What is the capital of {}?",
    "The mother tongue of {} is": "What is the mother tongue of {}?",
    "{} plays the sport of": "Which sport does {} play?",
    "The CEO of {} is": "Who is the CEO of {}?",
    "{} is located in": "Where is {} located?",
    "{} is headquartered in": "Where is {} headquartered?",
    "{} was written by": "Who wrote {}?",
    "{} was developed by": "Who developed {}?",
    "The occupation of {} is": "What is the occupation of {}?",
    "{} is a citizen of": "What is the country of citizenship of {}?",
    "{} was born in": "Where was {} born?",
    "{} were formed in": "Where were {} formed?",
    "The genre of {} is": "What is the genre of {}?",
}

_INSTRUCTIONS: tuple[str, ...] = (
    "Answer the question with a single word.",
    "Complete the sentence with the correct fact.",
    "Update the knowledge of the model with the new fact.",
)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def tokenizer_corpus() -> list[str]:
    """The built-in training corpus: a fixed, ordered list of English lines.

    Hand-written factual, conversational and instruction-style sentences, plus
    template expansions of a small fact table into statements, questions,
    question/answer pairs and ``Instructions: ...\\nInput: ...`` blocks.
    """
    lines = [line for line in _SENTENCES.splitlines() if line.strip()]
    objects = sorted({obj for _, _, obj in _FACTS})
    for i, (subject, relation, obj) in enumerate(_FACTS):
        prompt = _capitalise(relation.format(subject))
        question = _QUESTION_FORMS[relation].format(subject)
        new_obj = objects[(objects.index(obj) + 7) % len(objects)]
        lines.append(f"{prompt} {obj}.")
        lines.append(question)
        lines.append(f"Question: {question} Answer: {obj}")
        lines.append(f"{prompt} {new_obj}, not {obj}.")
        lines.append(f"Instructions: {_INSTRUCTIONS[i % len(_INSTRUCTIONS)]}\nInput: {prompt}\nOutput: {obj}")
        lines.append(f"Instructions: {_INSTRUCTIONS[(i + 1) % len(_INSTRUCTIONS)]}\nInput: {question}\nOutput: {new_obj}")
        lines.append(f"{obj} >> {new_obj} || {question}")
    return lines


def corpus_digest() -> str:
    """sha256 of the corpus text (part of every cache key derived from the tokenizer)."""
    return hashlib.sha256("\n".join(tokenizer_corpus()).encode("utf-8")).hexdigest()


def tokenizer_key(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> str:
    """Content key of the tokenizer built by :func:`train_tokenizer` with these settings."""
    return content_key(
        {
            "corpus_version": CORPUS_VERSION,
            "corpus_sha256": corpus_digest(),
            "vocab_size": vocab_size,
            "special_tokens": list(SPECIAL_TOKENS),
            "max_length": TOKENIZER_MAX_LENGTH,
        }
    )


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer in memory (deterministic; < 1 s).

    Returns a :class:`transformers.PreTrainedTokenizerFast` with
    ``pad/eos/bos/unk`` set as described in the module docstring.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for byte-level BPE, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=TOKENIZER_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i, (token, tok.convert_tokens_to_ids(token))
    return tok


def tokenizer_dir(root: Path | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Folder holding the saved tokenizer (trained and published atomically on first use).

    ``root`` defaults to :func:`~instructedit_plugin.models.cache.cache_dir`; the
    folder is ``<root>/tiny-bpe-<key>``.
    """
    root = Path(root) if root is not None else cache_dir()
    key = tokenizer_key(vocab_size)
    target = root / f"tiny-bpe-{key}"
    info = read_json(target / _INFO_FILE)
    if info is not None and info.get("key") == key:
        return target
    logger.info("training byte-level BPE tokenizer (vocab %d) into %s", vocab_size, target)
    tok = train_tokenizer(vocab_size)
    with atomic_dir(target) as tmp:
        tok.save_pretrained(tmp)
        write_json(tmp / _INFO_FILE, {"key": key, "corpus_version": CORPUS_VERSION, "vocab_size": len(tok)})
    return target


def load_tokenizer(root: Path | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Load the (cached) tiny tokenizer with :class:`~transformers.AutoTokenizer`, offline."""
    return AutoTokenizer.from_pretrained(tokenizer_dir(root, vocab_size), local_files_only=True)
