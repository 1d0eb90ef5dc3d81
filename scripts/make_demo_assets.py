"""Build lorafit's embedded demo assets: the sample chat dataset and the demo tokenizer.

Run from the repository root::

    python scripts/make_demo_assets.py

It writes, under ``src/lorafit/demo/``:

- ``chat_train.jsonl`` and ``chat_eval.jsonl``: one ``{"messages": [...]}`` conversation a
  line, generated from the templates and fact tables below (all written for lorafit).
- ``tokenizer/``: a byte-level BPE tokenizer trained on the training conversations, with
  Phi-3-mini-4k-instruct's special tokens, special-token settings and chat template.

The output is deterministic: a fixed seed drives every choice, so running the script
twice gives byte-identical files. The demo fine-tunes a randomly initialised tiny model
for a couple of minutes, so the data is deliberately regular: one assistant voice, a
fixed answer format per kind of question, and facts that recur across conversations.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

SEED = 20240423
N_TRAIN = 480
N_EVAL = 40
SYSTEM_SHARE = 0.85  # the rest of the conversations have no system message
TERSE_SHARE = 0.08  # conversations under TERSE_SYSTEM, where answers are the bare result

# The BPE vocabulary (special tokens included); a multiple of 64 keeps the embedding and
# head shapes friendly. The trainer stops early if the corpus has fewer merges to offer.
VOCAB_SIZE = 1536

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "src" / "lorafit" / "demo"

Turn = tuple[str, str]  # (user message, assistant reply)

# ---------------------------------------------------------------------------------------
# System prompts
# ---------------------------------------------------------------------------------------

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer clearly and briefly.",
    "You are a friendly assistant for the lorafit demo.",
    "You are a patient tutor who explains things simply.",
    "You are a concise assistant. Keep answers short and correct.",
    "You are a polite assistant that helps with numbers, words and short explanations.",
    "You are an assistant that answers questions accurately and kindly.",
]
TERSE_SYSTEM = "Reply with only the answer, no explanation."

# ---------------------------------------------------------------------------------------
# Greetings and small talk
# ---------------------------------------------------------------------------------------

HELLO_REPLY = "Hello! How can I help you today?"
GREETINGS = {
    "Hello!": HELLO_REPLY,
    "Hi": HELLO_REPLY,
    "Hi there!": HELLO_REPLY,
    "Hey, are you there?": "Yes, I'm here! How can I help you today?",
    "Good morning!": "Good morning! How can I help you today?",
    "Good afternoon.": "Good afternoon! How can I help you today?",
    "Good evening!": "Good evening! How can I help you today?",
    "How are you?": "I'm doing well, thank you for asking! What can I help you with?",
    "How are you doing today?": "I'm doing well, thank you for asking! What can I help you with?",
}
THANKS_REPLY = "You're welcome! Let me know if there is anything else I can help with."
THANKS = ["Thanks!", "Thank you.", "Thank you very much!", "Great, thanks.", "Perfect, thank you!"]
GOODBYES = {
    "Bye!": "Goodbye! Have a great day.",
    "Goodbye.": "Goodbye! Have a great day.",
    "See you later.": "See you later! Have a great day.",
    "That's all for now, bye.": "Goodbye! Have a great day.",
}
ABOUT_REPLY = (
    "I am a small demo assistant. I can do arithmetic, convert units, spell and reverse words, "
    "name capital cities, explain machine-learning terms and give short step-by-step guides."
)
ABOUT_QUESTIONS = ["Who are you?", "What can you do?", "What kind of questions can you answer?"]
GREETING_PREFIXES = ["Hi! ", "Hello! ", "Good morning! "]

# ---------------------------------------------------------------------------------------
# Fact tables
# ---------------------------------------------------------------------------------------

# country as it reads in a sentence, capital, continent
CAPITALS = [
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("the Netherlands", "Amsterdam", "Europe"),
    ("Belgium", "Brussels", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Switzerland", "Bern", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("the Czech Republic", "Prague", "Europe"),
    ("Romania", "Bucharest", "Europe"),
    ("Ukraine", "Kyiv", "Europe"),
    ("the United Kingdom", "London", "Europe"),
    ("Iceland", "Reykjavik", "Europe"),
    ("Croatia", "Zagreb", "Europe"),
    ("Bulgaria", "Sofia", "Europe"),
    ("Serbia", "Belgrade", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("the Philippines", "Manila", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"),
    ("Pakistan", "Islamabad", "Asia"),
    ("Bangladesh", "Dhaka", "Asia"),
    ("Nepal", "Kathmandu", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Saudi Arabia", "Riyadh", "Asia"),
    ("Jordan", "Amman", "Asia"),
    ("Qatar", "Doha", "Asia"),
    ("Kazakhstan", "Astana", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Tanzania", "Dodoma", "Africa"),
    ("Uganda", "Kampala", "Africa"),
    ("Rwanda", "Kigali", "Africa"),
    ("Zambia", "Lusaka", "Africa"),
    ("Algeria", "Algiers", "Africa"),
    ("Tunisia", "Tunis", "Africa"),
    ("Canada", "Ottawa", "North America"),
    ("the United States", "Washington, D.C.", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"),
    ("Panama", "Panama City", "North America"),
    ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"),
    ("Colombia", "Bogota", "South America"),
    ("Venezuela", "Caracas", "South America"),
    ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"),
]

# term -> (one-sentence definition, one or two sentences of detail, why it matters)
TERMS = {
    "fine-tuning": (
        "Fine-tuning is training a pretrained model a little further on a smaller dataset for a "
        "specific task.",
        "The model keeps what it learned in pretraining and adapts to the new data, which needs "
        "far less data and compute than training from scratch.",
        "It lets you adapt a large general model to your own task at a small fraction of the cost.",
    ),
    "LoRA": (
        "LoRA, or low-rank adaptation, fine-tunes a model by learning small low-rank updates while "
        "the original weights stay frozen.",
        "For a weight matrix W it trains two thin matrices A and B and computes W x + (alpha / r) B A x. "
        "Only A and B are trained, so very few parameters change.",
        "It needs much less memory than full fine-tuning, and the adapter it saves is only a few megabytes.",
    ),
    "QLoRA": (
        "QLoRA is LoRA trained on top of a base model whose frozen weights are stored in 4-bit precision.",
        "The base weights are quantized to 4-bit NormalFloat, while the LoRA matrices are trained in "
        "higher precision on top of them.",
        "It makes it possible to fine-tune large models on a single consumer GPU.",
    ),
    "LoRA rank": (
        "The LoRA rank r is the inner dimension of the two small matrices A and B.",
        "A larger rank gives the adapter more capacity but also more parameters. Values such as 8, "
        "16 or 64 are common.",
        "It sets the trade-off between how much the adapter can learn and how much memory it uses.",
    ),
    "an adapter": (
        "An adapter is a small set of extra weights trained for a task while the base model stays frozen.",
        "You can save it on its own, load it next to the base model, or merge it into the base weights.",
        "One base model can serve many tasks by swapping small adapters instead of whole models.",
    ),
    "a learning rate": (
        "The learning rate is the size of the step the optimizer takes when it updates the weights.",
        "If it is too high, training becomes unstable; if it is too low, the loss falls very slowly.",
        "It is usually the most important setting to get right when you train a model.",
    ),
    "an epoch": (
        "An epoch is one full pass over the training dataset.",
        "Training for three epochs means the model sees every example three times.",
        "Counting epochs tells you how often the model has seen the data, which helps you spot overfitting.",
    ),
    "batch size": (
        "The batch size is the number of examples processed together in one training step.",
        "Larger batches give smoother gradients but need more memory. Gradient accumulation can "
        "simulate a larger batch.",
        "It affects memory use, speed and how stable training is.",
    ),
    "a token": (
        "A token is a small piece of text, such as a word or part of a word, that a language model "
        "reads and writes.",
        "A tokenizer splits text into tokens and maps each one to an integer id.",
        "Models measure their input length and cost in tokens, not in characters.",
    ),
    "a tokenizer": (
        "A tokenizer turns text into a list of token ids and turns token ids back into text.",
        "Most modern tokenizers use byte-pair encoding, which merges frequent pairs of symbols into "
        "new tokens.",
        "A model only understands the ids of the tokenizer it was trained with.",
    ),
    "an embedding": (
        "An embedding is a vector of numbers that represents a token or another item.",
        "The model looks up one embedding per token id, and similar tokens tend to get similar vectors.",
        "Embeddings are how a model turns discrete tokens into numbers it can compute with.",
    ),
    "attention": (
        "Attention is the mechanism that lets each token look at other tokens and mix in their information.",
        "Each token builds a query, compares it with the keys of other tokens, and takes a weighted "
        "sum of their values.",
        "It is what lets a transformer use context from anywhere in the input.",
    ),
    "a transformer": (
        "A transformer is a neural network built from layers of attention and feed-forward blocks.",
        "Language models such as Phi-3 stack many transformer layers and predict the next token.",
        "It is the architecture behind almost every modern language model.",
    ),
    "the loss": (
        "The loss is a number that measures how wrong the model's predictions are.",
        "For language models it is usually the cross-entropy of the next token, and training tries "
        "to make it smaller.",
        "Watching the training and validation loss is the simplest way to see if training works.",
    ),
    "a gradient": (
        "A gradient tells you how the loss changes when each weight changes a little.",
        "Backpropagation computes the gradient, and the optimizer moves the weights against it.",
        "Without gradients the model would have no signal for how to improve.",
    ),
    "overfitting": (
        "Overfitting is when a model memorizes its training data and does worse on new data.",
        "You can see it when the training loss keeps falling while the validation loss goes up.",
        "An overfitted model looks good in training but fails on the examples that matter.",
    ),
    "quantization": (
        "Quantization stores numbers with fewer bits, for example 4-bit or 8-bit weights instead of "
        "16-bit ones.",
        "It shrinks the model and its memory use, at the cost of a small loss in precision.",
        "It lets large models run and train on smaller hardware.",
    ),
    "perplexity": (
        "Perplexity is the exponential of the average next-token loss.",
        "A perplexity of 10 means the model is, on average, as unsure as if it picked among 10 "
        "equally likely tokens.",
        "Lower perplexity on held-out text usually means a better language model.",
    ),
    "a chat template": (
        "A chat template is the rule that turns a list of chat messages into the exact text a model "
        "was trained on.",
        "For Phi-3 each message becomes a role tag, a new line, the message text and an end marker.",
        "Using the wrong template makes a chat model answer much worse.",
    ),
    "a system prompt": (
        "A system prompt is a message at the start of a chat that sets how the assistant should behave.",
        "It can give the assistant a role, a tone or rules, and it applies to the whole conversation.",
        "It steers the assistant without changing the model's weights.",
    ),
    "gradient checkpointing": (
        "Gradient checkpointing saves memory by recomputing some activations during the backward "
        "pass instead of storing them.",
        "It trades about one extra forward pass of compute for a large cut in activation memory.",
        "It lets you train with longer sequences or larger batches on the same hardware.",
    ),
    "mixed precision": (
        "Mixed precision training does most of the math in 16-bit numbers while keeping sensitive "
        "values in 32-bit.",
        "Formats such as bfloat16 make training faster and use less memory with little loss in quality.",
        "It is one of the easiest ways to speed up training on modern hardware.",
    ),
    "bfloat16": (
        "bfloat16 is a 16-bit number format with the same exponent range as 32-bit floats but fewer "
        "mantissa bits.",
        "Because its range matches float32, it rarely overflows, so it usually needs no loss scaling.",
        "It halves memory use compared with float32 and is well supported on modern accelerators.",
    ),
    "an optimizer": (
        "An optimizer is the algorithm that updates the weights using the gradients.",
        "AdamW is the usual choice for language models: it adapts the step for each weight and adds "
        "weight decay.",
        "The optimizer and its settings decide how quickly and how stably the model learns.",
    ),
    "warmup": (
        "Warmup is a short phase at the start of training where the learning rate rises slowly from "
        "near zero.",
        "After warmup the learning rate follows its normal schedule, for example a linear or cosine decay.",
        "It avoids large, unstable updates while the optimizer statistics are still poor.",
    ),
    "dropout": (
        "Dropout randomly sets some values to zero during training.",
        "With a dropout of 0.1, each value is dropped with a probability of ten percent, and dropout "
        "is switched off at inference time.",
        "It is a simple way to reduce overfitting.",
    ),
    "a validation set": (
        "A validation set is data held out from training and used to check how well the model generalizes.",
        "The model never trains on it; you only measure the loss or other metrics on it.",
        "It tells you when the model starts to overfit and which settings work best.",
    ),
    "packing": (
        "Packing puts several short training examples into one long sequence.",
        "Instead of padding every example to the same length, examples are joined until a row is full.",
        "It wastes less compute on padding tokens, so training runs faster.",
    ),
    "padding": (
        "Padding adds filler tokens so that sequences in a batch have the same length.",
        "The padding tokens are masked out, so they do not count in attention or in the loss.",
        "Batches need equal lengths, and padding is the simplest way to get them.",
    ),
    "context length": (
        "The context length is the largest number of tokens a model can read at once.",
        "Phi-3-mini-4k, for example, has a context length of about four thousand tokens.",
        "It limits how long a conversation or document the model can take into account.",
    ),
    "logits": (
        "Logits are the raw scores a model gives to every token in its vocabulary before softmax.",
        "Softmax turns the logits into probabilities, and the loss compares them with the true next token.",
        "Everything the model predicts comes from its logits.",
    ),
    "weight decay": (
        "Weight decay is a penalty that pulls the weights slowly toward zero during training.",
        "AdamW applies it directly to the weights at each step, separate from the gradient.",
        "It helps keep the model from overfitting.",
    ),
    "inference": (
        "Inference is running a trained model to get predictions, without updating its weights.",
        "For a chat model, inference means generating a reply one token at a time.",
        "It is how a trained model is actually used.",
    ),
    "gradient accumulation": (
        "Gradient accumulation adds up gradients over several small batches before taking one "
        "optimizer step.",
        "With a batch of 4 and 8 accumulation steps, each update sees 32 examples.",
        "It gives the effect of a large batch without the memory a large batch would need.",
    ),
    "a parameter": (
        "A parameter is a number inside a model that is learned during training, such as a weight or a bias.",
        "Phi-3-mini has about 3.8 billion parameters, while a LoRA adapter may train only a few million.",
        "The number of parameters is the usual measure of a model's size.",
    ),
}

# task (completes "How do I ...?") -> (steps, the step that matters most)
HOWTOS = {
    "make a cup of tea": (
        [
            "Boil fresh water.",
            "Put a tea bag in a cup.",
            "Pour the hot water over the tea bag.",
            "Wait three to five minutes, then remove the bag.",
            "Add milk or sugar if you like.",
        ],
        "Steeping for the right time matters most: too short is weak and too long is bitter.",
    ),
    "fine-tune a model with LoRA": (
        [
            "Pick a base model and a chat dataset.",
            "Apply the chat template and tokenize the conversations.",
            "Add LoRA adapters to the linear layers and freeze the base weights.",
            "Train for a few epochs while watching the validation loss.",
            "Save the adapter and test it on new prompts.",
        ],
        "Watching the validation loss matters most, because it shows when the model starts to overfit.",
    ),
    "prepare a chat dataset": (
        [
            "Collect conversations with user and assistant messages.",
            "Store each conversation as one line of JSON with a messages list.",
            "Check that roles alternate and that each conversation ends with the assistant.",
            "Hold out a small part of the data as a validation set.",
        ],
        "Checking the roles matters most, because broken conversations teach the model the wrong format.",
    ),
    "choose a learning rate": (
        [
            "Start from a value that worked for a similar model, such as 2e-4 for LoRA.",
            "Run a short training job and watch the loss.",
            "Lower the learning rate if the loss jumps around or grows.",
            "Raise it a little if the loss falls very slowly.",
        ],
        "Watching the loss in a short run matters most, because it shows quickly whether the value is sane.",
    ),
    "reduce memory use during training": (
        [
            "Use a smaller batch size with gradient accumulation.",
            "Turn on gradient checkpointing.",
            "Train in bfloat16 instead of float32.",
            "Use LoRA or QLoRA instead of full fine-tuning.",
        ],
        "Using LoRA or QLoRA matters most, because it removes the optimizer state of the frozen weights.",
    ),
    "evaluate a fine-tuned model": (
        [
            "Measure the loss on a held-out validation set.",
            "Compare it with the base model on the same data.",
            "Read a sample of generated answers by hand.",
            "Check a few prompts the model was not trained on.",
        ],
        "Reading real answers matters most, because a good loss does not always mean good replies.",
    ),
    "write a clear commit message": (
        [
            "Write a short summary line in the imperative mood.",
            "Leave a blank line after the summary.",
            "Explain what changed and why in the body.",
        ],
        "Explaining why matters most, because the code already shows what changed.",
    ),
    "back up my files": (
        [
            "Choose an external drive or a cloud service.",
            "Copy your important folders to it.",
            "Set up automatic backups on a schedule.",
            "Test a restore now and then.",
        ],
        "Testing a restore matters most, because a backup you cannot restore is not a backup.",
    ),
    "plant tomato seeds": (
        [
            "Fill small pots with seed compost.",
            "Sow two seeds in each pot, about half a centimetre deep.",
            "Water gently and keep the pots somewhere warm.",
            "Move the seedlings to bigger pots when they have true leaves.",
        ],
        "Warmth matters most, because tomato seeds germinate poorly in the cold.",
    ),
    "start running": (
        [
            "Get a pair of comfortable running shoes.",
            "Start with short runs mixed with walking.",
            "Run three times a week with rest days in between.",
            "Add a few minutes each week.",
        ],
        "Resting between runs matters most, because that is when your body adapts.",
    ),
    "fix a flat bicycle tyre": (
        [
            "Remove the wheel from the bike.",
            "Lever one side of the tyre off the rim and pull out the inner tube.",
            "Find the hole and patch it, or use a new tube.",
            "Put the tube and tyre back, then pump it to the right pressure.",
        ],
        "Checking the inside of the tyre for a thorn or glass matters most, or the new tube will "
        "go flat too.",
    ),
    "prepare for a job interview": (
        [
            "Read about the company and the role.",
            "Prepare short stories about your past work.",
            "Practise answering common questions out loud.",
            "Prepare two or three questions to ask them.",
        ],
        "Practising out loud matters most, because it makes your answers clear and calm.",
    ),
    "learn new words in a foreign language": (
        [
            "Learn a few words every day instead of many at once.",
            "Use flashcards with spaced repetition.",
            "Say each word out loud in a sentence.",
            "Review old words before adding new ones.",
        ],
        "Reviewing often matters most, because spaced repetition is what makes words stick.",
    ),
    "clean a laptop keyboard": (
        [
            "Turn off the laptop and unplug it.",
            "Tip it upside down and tap out loose crumbs.",
            "Use compressed air between the keys.",
            "Wipe the keys with a cloth that is only slightly damp.",
        ],
        "Turning the laptop off matters most, because it keeps you and the laptop safe.",
    ),
    "make a simple budget": (
        [
            "Write down your monthly income.",
            "List your fixed costs, such as rent and bills.",
            "Track what you spend for a month.",
            "Set a limit for each category and a goal for saving.",
        ],
        "Tracking your spending matters most, because it shows where the money really goes.",
    ),
    "boil an egg": (
        [
            "Put the egg in a pan and cover it with cold water.",
            "Bring the water to a boil.",
            "Simmer for six minutes for a soft egg or ten minutes for a hard one.",
            "Cool the egg in cold water before peeling.",
        ],
        "Timing matters most, because a minute or two changes the yolk completely.",
    ),
    "keep a houseplant healthy": (
        [
            "Put it where it gets the right amount of light.",
            "Water it when the top of the soil feels dry.",
            "Make sure the pot has drainage holes.",
            "Feed it lightly during spring and summer.",
        ],
        "Not overwatering matters most, because soggy soil rots the roots.",
    ),
    "write a good email": (
        [
            "Write a subject line that says what the email is about.",
            "Put the main point or request in the first sentence.",
            "Keep the body short and polite.",
            "Read it once more before you send it.",
        ],
        "Putting the main point first matters most, because many people only read the start.",
    ),
}

# fmt: off
WORDS = [
    "garden", "planet", "window", "river", "candle", "pencil", "orange", "bridge", "castle",
    "forest", "silver", "rabbit", "turtle", "basket", "mirror", "ladder", "pocket", "rocket",
    "button", "carpet", "dragon", "flower", "guitar", "hammer", "island", "jacket", "kitten",
    "lemon", "magnet", "needle", "ocean", "parrot", "puzzle", "spider", "ticket", "tomato",
    "violin", "walnut", "yellow", "zebra", "apple", "bread", "cloud", "dance", "eagle", "flame",
    "grape", "horse", "juice", "knife", "light", "money", "night", "paper", "queen", "radio",
    "smile", "table", "uncle", "voice", "water", "model", "token", "layer", "train", "learn",
    "adapter", "weight", "python", "matrix", "vector", "number", "letter", "answer", "summer",
    "winter", "autumn", "spring", "coffee", "butter", "monkey", "pepper", "cheese", "school",
    "friend", "travel", "market", "doctor", "mountain", "blanket", "kitchen", "picture",
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("strong", "weak"), ("full", "empty"), ("high", "low"),
    ("young", "old"), ("rich", "poor"), ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"),
    ("near", "far"), ("clean", "dirty"), ("thick", "thin"), ("heavy", "light"), ("first", "last"),
    ("above", "below"), ("buy", "sell"), ("win", "lose"), ("begin", "end"), ("push", "pull"),
    ("true", "false"), ("inside", "outside"), ("always", "never"), ("remember", "forget"),
    ("arrive", "leave"),
]

PLURALS = [
    ("child", "children"), ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"),
    ("person", "people"), ("man", "men"), ("woman", "women"), ("goose", "geese"),
    ("leaf", "leaves"), ("knife", "knives"), ("box", "boxes"), ("city", "cities"),
    ("bus", "buses"), ("baby", "babies"), ("wolf", "wolves"), ("sheep", "sheep"),
    ("fish", "fish"), ("cactus", "cacti"), ("potato", "potatoes"), ("day", "days"),
]

COLOUR_MIXES = [
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "grey"), ("blue", "white", "light blue"),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTH_DAYS = [
    ("January", "31 days"), ("February", "28 days, or 29 in a leap year"), ("March", "31 days"),
    ("April", "30 days"), ("May", "31 days"), ("June", "30 days"), ("July", "31 days"),
    ("August", "31 days"), ("September", "30 days"), ("October", "31 days"),
    ("November", "30 days"), ("December", "31 days"),
]
# fmt: on

# singular, plural, factor to the target unit, target plural, whether the factor is exact
CONVERSIONS = [
    ("kilometre", "kilometres", 0.621371, "miles", False),
    ("mile", "miles", 1.609344, "kilometres", False),
    ("kilogram", "kilograms", 2.204623, "pounds", False),
    ("pound", "pounds", 0.453592, "kilograms", False),
    ("metre", "metres", 3.28084, "feet", False),
    ("inch", "inches", 2.54, "centimetres", True),
    ("litre", "litres", 1000, "millilitres", True),
    ("hour", "hours", 60, "minutes", True),
    ("minute", "minutes", 60, "seconds", True),
    ("day", "days", 24, "hours", True),
    ("week", "weeks", 7, "days", True),
]

NAMES = ["Sam", "Ana", "Lee", "Maya", "Omar", "Nina", "Tom", "Priya", "Jonas", "Ling", "Kofi", "Eva"]
ITEMS = ["apples", "books", "stickers", "marbles", "cookies", "pencils", "stamps", "shells"]


# ---------------------------------------------------------------------------------------
# Conversation builders: each returns `turns` exchanges on one topic, the first one a
# fresh question and the rest follow-ups that refer back to it.
# ---------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Format a converted value: integers plainly, others with two decimals."""
    if abs(x - round(x)) < 1e-9:
        return str(round(x))
    return f"{x:.2f}"


def _arith_question(rng: random.Random, terse: bool) -> tuple[str, str, int]:
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        c = a + b
        q = rng.choice(
            [f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."]
        )
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        c = a - b
        q = rng.choice([f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}."])
    elif op == "*":
        a, b = rng.randint(2, 15), rng.randint(2, 12)
        c = a * b
        q = rng.choice([f"What is {a} times {b}?", f"What is {a} * {b}?", f"Multiply {a} by {b}."])
    else:
        b, c = rng.randint(2, 12), rng.randint(2, 15)
        a = b * c
        q = rng.choice([f"What is {a} divided by {b}?", f"What is {a} / {b}?", f"Divide {a} by {b}."])
    return q, (str(c) if terse else f"{a} {op} {b} = {c}."), c


def arithmetic(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    q, a, value = _arith_question(rng, terse)
    out = [(q, a)]
    for _ in range(turns - 1):
        kind = rng.choice(["add", "double", "parity", "new"])
        if kind == "add":
            d = rng.randint(2, 50)
            q = rng.choice([f"Now add {d} to that.", f"And if I add {d}?", f"Add {d} to the result."])
            a = str(value + d) if terse else f"{value} + {d} = {value + d}."
            value += d
        elif kind == "double":
            q = rng.choice(["And double it?", "What is twice that?", "Now multiply that by 2."])
            a = str(value * 2) if terse else f"{value} * 2 = {value * 2}."
            value *= 2
        elif kind == "parity" and not terse:
            q = rng.choice(["Is that even or odd?", "Is the result even?"])
            a = f"{value} is {'even' if value % 2 == 0 else 'odd'}."
        else:
            q, a, value = _arith_question(rng, terse)
        out.append((q, a))
    return out


def word_problem(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, change = rng.randint(3, 30), rng.randint(2, 20)
    if rng.random() < 0.5:
        q = f"{name} has {start} {item} and gets {change} more. How many {item} does {name} have now?"
        total = start + change
        a = f"{name} starts with {start} {item} and gets {change} more. "
        a += f"{start} + {change} = {total}, so {name} has {total} {item}."
    else:
        start += change
        q = f"{name} has {start} {item} and gives away {change}. How many {item} are left?"
        total = start - change
        a = f"{name} starts with {start} {item} and gives away {change}. "
        a += f"{start} - {change} = {total}, so {total} {item} are left."
    out = [(q, str(total) if terse else a)]
    if turns > 1:
        k = rng.randint(2, 4)
        q = f"If {name} then shares them equally among {k} friends, how many does each friend get?"
        each, rest = divmod(total, k)
        if terse:
            a = str(each)
        elif rest == 0:
            a = f"{total} / {k} = {each}, so each friend gets {each} {item}."
        else:
            a = f"{total} / {k} is {each} with {rest} left over, "
            a += f"so each friend gets {each} {item} and {rest} remain."
        out.append((q, a))
    if turns > 2:
        q = rng.choice(
            [f"Did {name} have an even number of {item} before sharing?", "Was that total even or odd?"]
        )
        word = "even" if total % 2 == 0 else "odd"
        out.append((q, word if terse else f"{total} is {word}."))
    return out


def _convert(rng: random.Random, terse: bool, exclude: tuple | None = None) -> tuple[str, str, tuple]:
    unit = rng.choice([u for u in CONVERSIONS if u != exclude])
    sing, plur, factor, t_plur, exact = unit
    x = rng.randint(2, 60)
    y = x * factor
    q = rng.choice(
        [
            f"Convert {x} {plur} to {t_plur}.",
            f"How many {t_plur} are in {x} {plur}?",
            f"What is {x} {plur} in {t_plur}?",
        ]
    )
    if terse:
        a = f"{_num(y)} {t_plur}"
    elif exact:
        a = f"{x} {plur} is {_num(y)} {t_plur}, because 1 {sing} is {_num(factor)} {t_plur}."
    else:
        a = f"{x} {plur} is about {_num(y)} {t_plur}, because 1 {sing} is about {factor} {t_plur}."
    return q, a, unit


def _temperature(rng: random.Random, terse: bool) -> Turn:
    c = rng.choice(range(-20, 45, 5))
    f = c * 9 // 5 + 32
    if rng.random() < 0.5:
        q = rng.choice([f"Convert {c} degrees Celsius to Fahrenheit.", f"What is {c} C in Fahrenheit?"])
        a = f"{f} F" if terse else f"{c} degrees Celsius is {f} degrees Fahrenheit, using F = C * 9/5 + 32."
    else:
        q = rng.choice([f"Convert {f} degrees Fahrenheit to Celsius.", f"What is {f} F in Celsius?"])
        a = f"{c} C" if terse else f"{f} degrees Fahrenheit is {c} degrees Celsius, using C = (F - 32) * 5/9."
    return q, a


def conversion(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    if rng.random() < 0.25:
        return [_temperature(rng, terse) for _ in range(turns)]
    q, a, unit = _convert(rng, terse)
    out = [(q, a)]
    _, plur, factor, t_plur, exact = unit
    for _ in range(turns - 1):
        if rng.random() < 0.6:
            x = rng.randint(2, 60)
            y = x * factor
            q = rng.choice([f"What about {x} {plur}?", f"And {x} {plur}?"])
            approx = "" if exact else "about "
            a = f"{_num(y)} {t_plur}" if terse else f"{x} {plur} is {approx}{_num(y)} {t_plur}."
            out.append((q, a))
        else:
            q, a, unit = _convert(rng, terse, exclude=unit)
            _, plur, factor, t_plur, exact = unit
            out.append((q, a))
    return out


def _word_task(rng: random.Random, word: str, terse: bool) -> Turn:
    task = rng.choice(["reverse", "spell", "count", "upper", "first", "last"])
    if task == "reverse":
        q = rng.choice([f"Reverse the word '{word}'.", f"What is '{word}' spelled backwards?"])
        a = word[::-1] if terse else f"'{word}' reversed is '{word[::-1]}'."
    elif task == "spell":
        q = rng.choice([f"Spell '{word}' letter by letter.", f"How do you spell '{word}'?"])
        spelled = "-".join(word.upper())
        a = spelled if terse else f"'{word}' is spelled {spelled}."
    elif task == "count":
        q = rng.choice([f"How many letters are in '{word}'?", f"How long is the word '{word}'?"])
        a = str(len(word)) if terse else f"'{word}' has {len(word)} letters."
    elif task == "upper":
        q = rng.choice([f"Write '{word}' in capital letters.", f"Make '{word}' uppercase."])
        a = word.upper() if terse else f"In capital letters, '{word}' is {word.upper()}."
    elif task == "first":
        q = f"What is the first letter of '{word}'?"
        a = word[0] if terse else f"The first letter of '{word}' is '{word[0]}'."
    else:
        q = f"What is the last letter of '{word}'?"
        a = word[-1] if terse else f"The last letter of '{word}' is '{word[-1]}'."
    return q, a


def words(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    word = rng.choice(WORDS)
    out = [_word_task(rng, word, terse)]
    for _ in range(turns - 1):
        if rng.random() < 0.5:
            q, a = _word_task(rng, word, terse)
        else:
            word = rng.choice(WORDS)
            q, a = _word_task(rng, word, terse)
            q = "Now this one: " + q[0].lower() + q[1:] if rng.random() < 0.3 else q
        out.append((q, a))
    return out


def _country_title(country: str) -> str:
    return country[0].upper() + country[1:]


def _capital_question(rng: random.Random, entry: tuple[str, str, str], terse: bool) -> Turn:
    country, capital, _ = entry
    if rng.random() < 0.8:
        q = rng.choice(
            [
                f"What is the capital of {country}?",
                f"Which city is the capital of {country}?",
                f"Tell me the capital of {country}.",
                f"What's the capital city of {country}?",
            ]
        )
        a = capital if terse else f"The capital of {country} is {capital}."
    else:
        q = rng.choice(
            [f"{capital} is the capital of which country?", f"Which country has {capital} as its capital?"]
        )
        a = _country_title(country) if terse else f"{capital} is the capital of {country}."
    return q, a


def capitals(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    entry = rng.choice(CAPITALS)
    out = [_capital_question(rng, entry, terse)]
    for _ in range(turns - 1):
        if rng.random() < 0.35 and not terse:
            country, _, continent = entry
            q = rng.choice(["Which continent is it in?", f"And which continent is {country} in?"])
            a = f"{_country_title(country)} is in {continent}."
        else:
            entry = rng.choice([e for e in CAPITALS if e != entry])
            country, capital, _ = entry
            q = rng.choice([f"And {country}?", f"What about {country}?", f"And the capital of {country}?"])
            a = capital if terse else f"The capital of {country} is {capital}."
        out.append((q, a))
    return out


def _bare(term: str) -> str:
    """'a learning rate' -> 'learning rate', for questions like 'Define learning rate.'"""
    for article in ("a ", "an ", "the "):
        if term.startswith(article):
            return term[len(article) :]
    return term


def definitions(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    term = rng.choice(list(TERMS))
    short, detail, why = TERMS[term]
    bare = _bare(term)
    is_ = "are" if term.endswith("its") else "is"  # "logits"
    if rng.random() < 0.35:
        q = rng.choice([f"Define {bare} in one sentence.", f"In one sentence, what {is_} {term}?"])
        a = short
    else:
        q = rng.choice(
            [
                f"What {is_} {term}?",
                f"Explain {bare}.",
                f"Can you explain what {bare} means?",
                f"What does {bare} mean?",
            ]
        )
        a = f"{short} {detail}"
    out = [(q, a)]
    follow_ups = [
        (rng.choice(["Why does it matter?", "Why is that useful?", "Why should I care about it?"]), why),
        (rng.choice(["Can you say that in one sentence?", "Give me the short version."]), short),
    ]
    if a == short:
        follow_ups[1] = (rng.choice(["Can you tell me more?", "Can you explain a bit more?"]), detail)
    rng.shuffle(follow_ups)
    return out + follow_ups[: turns - 1]  # turns is at most 3


def howto(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    task = rng.choice(list(HOWTOS))
    steps, key = HOWTOS[task]
    q = rng.choice(
        [f"How do I {task}?", f"What are the steps to {task}?", f"Give me a short guide to {task}."]
    )
    # the user asks "How do I back up my files?"; the reply says "your files"
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
    a = f"Here is how to {task.replace('my ', 'your ')}:\n{numbered}"
    out = [(q, a)]
    for i in range(turns - 1):
        if i == 0:
            q = rng.choice(["Which step matters most?", "What is the most important step?"])
            out.append((q, key))
        else:
            q = rng.choice(["How many steps was that?", "How many steps are there?"])
            out.append((q, f"There are {len(steps)} steps."))
    return out


def _fact(rng: random.Random, terse: bool) -> Turn:
    kind = rng.choice(["opposite", "plural", "colour", "day", "month", "parity", "larger", "square"])
    if kind == "opposite":
        w, o = rng.choice(OPPOSITES)
        w, o = (w, o) if rng.random() < 0.5 else (o, w)
        q = rng.choice([f"What is the opposite of '{w}'?", f"Give me the opposite of '{w}'."])
        return q, o if terse else f"The opposite of '{w}' is '{o}'."
    if kind == "plural":
        s, p = rng.choice(PLURALS)
        q = rng.choice([f"What is the plural of '{s}'?", f"What is more than one '{s}' called?"])
        return q, p if terse else f"The plural of '{s}' is '{p}'."
    if kind == "colour":
        x, y, z = rng.choice(COLOUR_MIXES)
        q = f"What colour do you get if you mix {x} and {y}?"
        return q, z if terse else f"Mixing {x} and {y} gives {z}."
    if kind == "day":
        i = rng.randrange(7)
        if rng.random() < 0.5:
            q = f"What day comes after {DAYS[i]}?"
            return q, DAYS[(i + 1) % 7] if terse else f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
        q = f"What day comes before {DAYS[i]}?"
        return q, DAYS[i - 1] if terse else f"{DAYS[i - 1]} comes before {DAYS[i]}."
    if kind == "month":
        m, d = rng.choice(MONTH_DAYS)
        q = f"How many days are in {m}?"
        return q, d if terse else f"{m} has {d}."
    if kind == "parity":
        n = rng.randint(1, 999)
        q = rng.choice([f"Is {n} even or odd?", f"Is {n} an even number?"])
        word = "even" if n % 2 == 0 else "odd"
        return q, word if terse else f"{n} is {word}."
    if kind == "larger":
        a, b = rng.sample(range(1, 1000), 2)
        q = rng.choice([f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?"])
        big, small = max(a, b), min(a, b)
        return q, str(big) if terse else f"{big} is larger than {small}."
    n = rng.randint(2, 20)
    q = rng.choice([f"What is {n} squared?", f"What is the square of {n}?"])
    return q, str(n * n) if terse else f"{n} squared is {n} * {n} = {n * n}."


def facts(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    return [_fact(rng, terse) for _ in range(turns)]


def about(rng: random.Random, turns: int, terse: bool) -> list[Turn]:
    out = [(rng.choice(ABOUT_QUESTIONS), ABOUT_REPLY)]
    if turns > 1:
        out.extend(pick_topic(rng, exclude=about)(rng, turns - 1, terse))
    return out


# topic builder, weight; TERSE_TOPICS can be answered with the bare result
TOPICS: list[tuple[Callable[[random.Random, int, bool], list[Turn]], float]] = [
    (arithmetic, 3.0),
    (word_problem, 1.0),
    (conversion, 2.0),
    (words, 2.0),
    (capitals, 2.5),
    (definitions, 3.0),
    (howto, 1.5),
    (facts, 2.0),
    (about, 0.4),
]
TERSE_TOPICS = [arithmetic, word_problem, conversion, words, capitals, facts]


def pick_topic(rng: random.Random, exclude: Callable | None = None) -> Callable:
    choices = [(f, w) for f, w in TOPICS if f is not exclude]
    return rng.choices([f for f, _ in choices], weights=[w for _, w in choices])[0]


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """One conversation: optional system message, then 1-3 user/assistant exchanges."""
    turns = rng.choices([1, 2, 3], weights=[0.52, 0.30, 0.18])[0]
    terse = rng.random() < TERSE_SHARE
    if terse:
        system = TERSE_SYSTEM
        exchanges = rng.choice(TERSE_TOPICS)(rng, turns, True)
    else:
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_SHARE else None
        shape = rng.random()
        if turns >= 2 and shape < 0.2:  # greeting, then the question
            greeting = rng.choice(list(GREETINGS))
            exchanges = [(greeting, GREETINGS[greeting]), *pick_topic(rng)(rng, turns - 1, False)]
        elif turns >= 2 and shape < 0.4:  # the question, then thanks or goodbye
            exchanges = pick_topic(rng)(rng, turns - 1, False)
            if rng.random() < 0.7:
                exchanges.append((rng.choice(THANKS), THANKS_REPLY))
            else:
                bye = rng.choice(list(GOODBYES))
                exchanges.append((bye, GOODBYES[bye]))
        elif turns == 1 and shape < 0.12:  # greeting folded into the question
            q, a = pick_topic(rng, exclude=about)(rng, 1, False)[0]
            prefix = rng.choice(GREETING_PREFIXES)
            reply_prefix = "Good morning! " if prefix.startswith("Good") else "Hi! "
            exchanges = [(prefix + q, reply_prefix + a)]
        else:
            exchanges = pick_topic(rng)(rng, turns, False)
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in exchanges[:turns]:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return messages


def make_dataset(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Generate ``N_TRAIN + N_EVAL`` distinct conversations and split them.

    Two conversations count as the same when their user and assistant messages match,
    whatever their system prompts, so no eval conversation is a train one with another
    system prompt.
    """
    rng = random.Random(seed)
    seen: set[tuple[tuple[str, str], ...]] = set()
    rows: list[dict] = []
    while len(rows) < N_TRAIN + N_EVAL:
        messages = conversation(rng)
        key = tuple((m["role"], m["content"]) for m in messages if m["role"] != "system")
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows[N_EVAL:], rows[:N_EVAL]


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

# Phi-3-mini-4k-instruct's tokens, in its order. Phi-3 has <unk>, <s>, </s> at 0-2 and the
# rest at 32000-32010 after its 32k SentencePiece vocabulary; the demo keeps them all at
# the front (ids 0-13) so their ids do not depend on the BPE vocabulary size.
# token -> rstrip, as Phi-3 sets it: the role and <|end|> markers swallow the whitespace
# that follows them, so "<|user|>\nHi" encodes as <|user|> + "Hi" (the newline is part of
# the template text but not of the token ids), exactly like the real tokenizer.
SPECIAL_TOKENS = {
    "<unk>": False,
    "<s>": False,
    "</s>": True,
    "<|endoftext|>": False,
    "<|assistant|>": True,
    "<|placeholder1|>": True,
    "<|placeholder2|>": True,
    "<|placeholder3|>": True,
    "<|placeholder4|>": True,
    "<|system|>": True,
    "<|end|>": True,
    "<|placeholder5|>": True,
    "<|placeholder6|>": True,
    "<|user|>": True,
}
NOT_SPECIAL = {"</s>"}  # Phi-3 declares </s> as an added token that is not special

# Behaves exactly like Phi-3-mini-4k-instruct's template: each known role becomes
# "<|role|>\n" + content + "<|end|>\n" (other roles are skipped); then either the
# generation prompt "<|assistant|>\n" or, for a finished conversation, the eos token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] in ['system', 'user', 'assistant'] -%}\n"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{ '<|assistant|>\\n' }}\n"
    "{%- else -%}\n"
    "{{ eos_token }}\n"
    "{%- endif -%}\n"
)


def corpus(rows: list[dict]) -> Iterator[str]:
    for row in rows:
        for message in row["messages"]:
            yield message["content"]


def make_tokenizer(rows: list[dict], out_dir: Path) -> None:
    """Train the byte-level BPE on ``rows`` and save it with Phi-3's settings."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one, as Phi-3's Llama tokenizer splits them; then GPT-2 style bytes,
    # so every string round-trips and nothing is ever <unk>.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets cover the whole token
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(rows), trainer)
    tok.add_special_tokens(
        [
            AddedToken(t, rstrip=rstrip, lstrip=False, normalized=False, special=t not in NOT_SPECIAL)
            for t, rstrip in SPECIAL_TOKENS.items()
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",  # as Phi-3 ships it; lorafit trains with pad = unk
        model_max_length=2048,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder to write (default: the package)")
    args = parser.parse_args()
    train, eval_ = make_dataset()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out / "chat_train.jsonl")
    write_jsonl(eval_, args.out / "chat_eval.jsonl")
    make_tokenizer(train, args.out / "tokenizer")
    print(f"wrote {len(train)} train and {len(eval_)} eval conversations and the tokenizer to {args.out}")


if __name__ == "__main__":
    main()
