"""Deterministic, offline demo corpus for every MiniMind stage: bilingual (Chinese/English), templated, small.

    python dataset/demo_data.py                                  # writes dataset/demo/*.jsonl in about a second
    python dataset/demo_data.py --out_dir /tmp/demo --scale 0.05 --seed 0    # tiny corpus for tests

All text is written by this file: a hand-made table of facts (countries and capitals, planets, chemical
elements, animals, colours, opposites, days and months), small-number arithmetic with worked answers,
simple instructions (compare two numbers, sort a short list, convert units), self-identity statements
and a tiny cooking domain for LoRA. Answers are short, templated sentences that END with the checkable
answer ("法国的首都是巴黎。", "3+5=8."), so a tiny model (hidden 64-256, 2-8 layers) learns them on a
2-core CPU in minutes, and `dataset.scoring.check_answer` can score a generation by its last numbers or words.

Files (original jsonl formats, spec section 11), line counts at scale=1 (2 MB in all):
    pretrain.jsonl        4000  {"text"}: 1-4 "<|im_start|>...<|im_end|>" segments joined by spaces, like pretrain_hq
    sft.jsonl             3000  {"conversations"}: single and multi-turn, ~15% with a system turn, ~3% with a
                                leading system message whose "functions" list turns on the tools template
    dpo.jsonl              500  {"chosen", "rejected"}: chosen correct; rejected wrong, rambling or a refusal
    rlaif.jsonl            500  {"conversations", "answer"}: last assistant turn is the placeholder "无";
                                "answer" is the checkable reference answer; questions from the whole mix
    rlaif_units.jsonl      500  the same layout, unit conversions only (the skill RL improves, bench_rl.py)
    r1.jsonl              1000  {"conversations"}: assistant "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>"
    lora_identity.jsonl    150  {"conversations"}: who MiniMind is, in both languages
    lora_domain.jsonl      300  {"conversations"}: a made-up home-cooking domain (not in pretrain or SFT)
    eval.jsonl             170  {"question", "answer", "kind"}: held out, scored by dataset/scoring.py
    rlaif_units_eval.jsonl  96  the same layout: every held-out (unit, number) pair in every phrasing

With the shipped tokenizer: pretrain ~240k tokens (at most ~220 per line), SFT ~170k (95% of conversations
under 90 tokens; the tool conversations, whose preamble is long, up to ~510), R1 ~70k.

Held out: arithmetic pairs, compare/sort/unit/multi-step instances chosen by a CRC of their numbers never
appear in any training file; for facts, the last question template of every kind is used only in
eval.jsonl, while the facts themselves are taught by pretrain paragraphs (several wordings per fact) and the
other phrasings (SFT states every fact once before its random mix, asks each kind in seven phrasings: the three
training templates of KINDS and four of MORE_QUESTIONS, and opens about a third of its questions with "请问",
"Quick question: " and the like, so a question's wording matters less than what it asks).
Output depends only on (seed, scale): two runs write byte-identical files.
"""
import argparse
import json
import random
import zlib
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(pretrain=4000, sft=3000, dpo=500, rlaif=500, rlaif_units=500, r1=1000, lora_identity=150, lora_domain=300)


# ---- Facts (hand-written). Each row: the zh values, then the en values, then values shared by both ----

def _rows(keys: str, rows: list, shared: str = "") -> list[dict]:
    """Turn tuples into {"zh": fields, "en": fields}; English fields also get a capitalised UPPER-key copy."""
    keys, shared = keys.split(), shared.split()
    out = []
    for r in rows:
        n = len(keys)
        common = dict(zip(shared, r[2 * n:]))
        zh, en = {**dict(zip(keys, r[:n])), **common}, {**dict(zip(keys, r[n:2 * n])), **common}
        en.update({k.upper(): str(v)[:1].upper() + str(v)[1:] for k, v in en.items()})
        zh.update({k.upper(): v for k, v in zh.items() if k.upper() not in zh})
        out.append({"zh": zh, "en": en})
    return out


COUNTRIES = _rows("c cap o", [
    ("中国", "北京", "亚洲", "China", "Beijing", "Asia"),
    ("日本", "东京", "亚洲", "Japan", "Tokyo", "Asia"),
    ("韩国", "首尔", "亚洲", "South Korea", "Seoul", "Asia"),
    ("印度", "新德里", "亚洲", "India", "New Delhi", "Asia"),
    ("泰国", "曼谷", "亚洲", "Thailand", "Bangkok", "Asia"),
    ("法国", "巴黎", "欧洲", "France", "Paris", "Europe"),
    ("英国", "伦敦", "欧洲", "the United Kingdom", "London", "Europe"),
    ("德国", "柏林", "欧洲", "Germany", "Berlin", "Europe"),
    ("意大利", "罗马", "欧洲", "Italy", "Rome", "Europe"),
    ("西班牙", "马德里", "欧洲", "Spain", "Madrid", "Europe"),
    ("俄罗斯", "莫斯科", "欧洲", "Russia", "Moscow", "Europe"),
    ("埃及", "开罗", "非洲", "Egypt", "Cairo", "Africa"),
    ("肯尼亚", "内罗毕", "非洲", "Kenya", "Nairobi", "Africa"),
    ("美国", "华盛顿", "北美洲", "the United States", "Washington", "North America"),
    ("加拿大", "渥太华", "北美洲", "Canada", "Ottawa", "North America"),
    ("墨西哥", "墨西哥城", "北美洲", "Mexico", "Mexico City", "North America"),
    ("巴西", "巴西利亚", "南美洲", "Brazil", "Brasilia", "South America"),
    ("阿根廷", "布宜诺斯艾利斯", "南美洲", "Argentina", "Buenos Aires", "South America"),
    ("澳大利亚", "堪培拉", "大洋洲", "Australia", "Canberra", "Oceania"),
    ("新西兰", "惠灵顿", "大洋洲", "New Zealand", "Wellington", "Oceania"),
])
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()
PLANETS = _rows("p note", [
    ("水星", "水星是最小的行星", "Mercury", "Mercury is the smallest planet"),
    ("金星", "金星是最热的行星", "Venus", "Venus is the hottest planet"),
    ("地球", "地球是我们居住的行星", "Earth", "Earth is the planet we live on"),
    ("火星", "火星看起来是红色的", "Mars", "Mars looks red"),
    ("木星", "木星是最大的行星", "Jupiter", "Jupiter is the largest planet"),
    ("土星", "土星有美丽的光环", "Saturn", "Saturn has beautiful rings"),
    ("天王星", "天王星是躺着自转的", "Uranus", "Uranus spins on its side"),
    ("海王星", "海王星离太阳最远", "Neptune", "Neptune is the farthest from the Sun"),
])
for _i, _r in enumerate(PLANETS):
    for _lang in ("zh", "en"):
        _r[_lang].update(n=_i + 1, nth=ORDINALS[_i])
ELEMENTS = _rows("e", [
    ("氢", "hydrogen", "H", 1), ("氦", "helium", "He", 2), ("锂", "lithium", "Li", 3), ("碳", "carbon", "C", 6),
    ("氮", "nitrogen", "N", 7), ("氧", "oxygen", "O", 8), ("氖", "neon", "Ne", 10), ("钠", "sodium", "Na", 11),
    ("镁", "magnesium", "Mg", 12), ("铝", "aluminium", "Al", 13), ("硫", "sulfur", "S", 16),
    ("氯", "chlorine", "Cl", 17), ("钾", "potassium", "K", 19), ("钙", "calcium", "Ca", 20), ("铁", "iron", "Fe", 26),
    ("铜", "copper", "Cu", 29), ("锌", "zinc", "Zn", 30), ("银", "silver", "Ag", 47), ("金", "gold", "Au", 79),
], shared="sym num")
SOUNDS = _rows("x ax snd", [
    ("狗", "狗", "汪汪", "dog", "a dog", "woof"), ("猫", "猫", "喵喵", "cat", "a cat", "meow"),
    ("牛", "牛", "哞哞", "cow", "a cow", "moo"), ("羊", "羊", "咩咩", "sheep", "a sheep", "baa"),
    ("鸭子", "鸭子", "嘎嘎", "duck", "a duck", "quack"), ("猪", "猪", "哼哼", "pig", "a pig", "oink"),
    ("青蛙", "青蛙", "呱呱", "frog", "a frog", "croak"), ("老鼠", "老鼠", "吱吱", "mouse", "a mouse", "squeak"),
    ("蜜蜂", "蜜蜂", "嗡嗡", "bee", "a bee", "buzz"), ("猫头鹰", "猫头鹰", "咕咕", "owl", "an owl", "hoot"),
    ("马", "马", "咴咴", "horse", "a horse", "neigh"), ("公鸡", "公鸡", "喔喔", "rooster", "a rooster", "cock-a-doodle-doo"),
])
HABITATS = _rows("x ax home", [
    ("骆驼", "骆驼", "沙漠里", "camel", "a camel", "the desert"),
    ("企鹅", "企鹅", "南极", "penguin", "a penguin", "Antarctica"),
    ("北极熊", "北极熊", "北极", "polar bear", "a polar bear", "the Arctic"),
    ("猴子", "猴子", "森林里", "monkey", "a monkey", "the forest"),
    ("熊猫", "熊猫", "竹林里", "panda", "a panda", "bamboo forests"),
    ("鲸鱼", "鲸鱼", "海洋里", "whale", "a whale", "the ocean"),
    ("狮子", "狮子", "草原上", "lion", "a lion", "the grassland"),
    ("蜜蜂", "蜜蜂", "蜂巢里", "bee", "a bee", "a hive"),
    ("松鼠", "松鼠", "树上", "squirrel", "a squirrel", "trees"),
    ("兔子", "兔子", "洞里", "rabbit", "a rabbit", "a burrow"),
])
LEGS = _rows("x ax", [
    ("狗", "狗", "dog", "a dog", 4), ("猫", "猫", "cat", "a cat", 4), ("马", "马", "horse", "a horse", 4),
    ("鸡", "鸡", "chicken", "a chicken", 2), ("鸭子", "鸭子", "duck", "a duck", 2), ("鸟", "鸟", "bird", "a bird", 2),
    ("蜘蛛", "蜘蛛", "spider", "a spider", 8), ("蚂蚁", "蚂蚁", "ant", "an ant", 6),
    ("蜜蜂", "蜜蜂", "bee", "a bee", 6), ("蛇", "蛇", "snake", "a snake", 0),
], shared="legs")
COLOURS = _rows("t col", [
    ("天空", "蓝色", "the sky", "blue"), ("草", "绿色", "grass", "green"), ("雪", "白色", "snow", "white"),
    ("香蕉", "黄色", "a banana", "yellow"), ("草莓", "红色", "a strawberry", "red"),
    ("橙子", "橙色", "an orange", "orange"), ("茄子", "紫色", "an eggplant", "purple"),
    ("煤炭", "黑色", "coal", "black"), ("牛奶", "白色", "milk", "white"), ("柠檬", "黄色", "a lemon", "yellow"),
    ("大海", "蓝色", "the sea", "blue"), ("乌鸦", "黑色", "a crow", "black"),
])
_OPP = [("大", "小", "big", "small"), ("高", "矮", "tall", "short"), ("快", "慢", "fast", "slow"),
        ("冷", "热", "cold", "hot"), ("上", "下", "up", "down"), ("多", "少", "many", "few"),
        ("长", "短", "long", "short"), ("黑", "白", "black", "white"), ("早", "晚", "early", "late"),
        ("胖", "瘦", "fat", "thin"), ("新", "旧", "new", "old"), ("远", "近", "far", "near"),
        ("轻", "重", "light", "heavy"), ("左", "右", "left", "right"), ("前", "后", "front", "back")]
OPPOSITES = _rows("w opp", [(a, b, c, d) for a, b, c, d in _OPP] + [(b, a, d, c) for a, b, c, d in _OPP])
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS = _rows("d nxt prv", [(DAYS_ZH[i], DAYS_ZH[(i + 1) % 7], DAYS_ZH[i - 1],
                            DAYS_EN[i], DAYS_EN[(i + 1) % 7], DAYS_EN[i - 1]) for i in range(7)])
MONTHS_ZH = [f"{i}月" for i in range(1, 13)]  # digits, so no month name ends another ("一月" ends "十一月")
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
MONTHS = _rows("m", [(MONTHS_ZH[i], MONTHS_EN[i], i + 1, ORDINALS[i], MONTH_DAYS[i]) for i in range(12)],
               shared="n nth days")
DISHES = _rows("d ing how", [  # LoRA domain only: never used in pretrain or SFT
    ("番茄炒蛋", "番茄和鸡蛋", "炒", "tomato and egg stir-fry", "tomatoes and eggs", "stir-frying", 10),
    ("青椒土豆丝", "土豆和青椒", "炒", "shredded potatoes with peppers", "potatoes and green peppers", "stir-frying", 15),
    ("红烧肉", "猪肉、酱油和糖", "炖", "braised pork", "pork, soy sauce and sugar", "stewing", 60),
    ("蛋炒饭", "米饭、鸡蛋和葱", "炒", "egg fried rice", "rice, eggs and scallions", "stir-frying", 10),
    ("清蒸鱼", "鱼、姜和葱", "蒸", "steamed fish", "fish, ginger and scallions", "steaming", 20),
    ("饺子", "面粉、猪肉和白菜", "煮", "dumplings", "flour, pork and cabbage", "boiling", 40),
    ("紫菜蛋花汤", "紫菜和鸡蛋", "煮", "seaweed and egg soup", "seaweed and eggs", "boiling", 8),
    ("麻婆豆腐", "豆腐、牛肉末和豆瓣酱", "烧", "mapo tofu", "tofu, minced beef and bean paste", "simmering", 20),
    ("宫保鸡丁", "鸡肉、花生和辣椒", "炒", "kung pao chicken", "chicken, peanuts and chili peppers", "stir-frying", 25),
    ("凉拌黄瓜", "黄瓜、蒜和醋", "拌", "cucumber salad", "cucumbers, garlic and vinegar", "mixing", 5),
    ("蒸馒头", "面粉、酵母和水", "蒸", "steamed buns", "flour, yeast and water", "steaming", 30),
    ("烤红薯", "红薯", "烤", "roasted sweet potatoes", "sweet potatoes", "roasting", 45),
], shared="mins")

TABLES = dict(countries=COUNTRIES, planets=PLANETS, elements=ELEMENTS, sounds=SOUNDS, habitats=HABITATS, legs=LEGS,
              colours=COLOURS, opposites=OPPOSITES, days=DAYS, months=MONTHS, dishes=DISHES)

# ---- Question templates. The LAST question of every list is held out: it appears only in eval.jsonl ----
# kind: (table name, answer field, {lang: [questions]}, {lang: answer sentence ending with the answer field})
KINDS = {
    "capital": ("countries", "cap", {
        "zh": ["{c}的首都是哪里？", "{c}的首都是哪座城市？", "请告诉我{c}的首都。", "你知道{c}的首都叫什么吗？"],
        "en": ["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}.",
               "Do you know the name of the capital of {c}?"]},
        {"zh": "{c}的首都是{cap}。", "en": "The capital of {c} is {cap}."}),
    "continent": ("countries", "o", {
        "zh": ["{c}在哪个大洲？", "{c}位于哪个洲？", "{c}属于哪个大洲？", "请问{c}是哪个洲的国家？"],
        "en": ["Which continent is {c} in?", "On which continent is {c}?", "Where is {c} located?",
               "{C} belongs to which continent?"]},
        {"zh": "{c}位于{o}。", "en": "{C} is in {o}."}),
    "planet_order": ("planets", "n", {
        "zh": ["{p}是离太阳第几近的行星？", "从太阳往外数，{p}排第几？", "{p}在八大行星中排第几？", "请问{p}是太阳系的第几颗行星？"],
        "en": ["What is the position of {p} counting from the Sun?", "Counting from the Sun, where is {p}?",
               "Which number planet from the Sun is {p}?", "How far down the list from the Sun is {p}?"]},
        {"zh": "从太阳往外数，{p}排第{n}。", "en": "Counting from the Sun, {p} is number {n}."}),
    "planet": ("planets", "p", {
        "zh": ["离太阳第{n}近的行星是哪一颗？", "太阳系中第{n}颗行星是什么？", "从太阳往外数第{n}颗行星叫什么？",
               "按离太阳由近到远，第{n}颗行星是哪个？"],
        "en": ["Which planet is number {n} from the Sun?", "What is the {nth} planet from the Sun?",
               "Name planet number {n} counting from the Sun.",
               "Counting outward from the Sun, which planet comes in position {n}?"]},
        {"zh": "离太阳第{n}近的行星是{p}。", "en": "Planet number {n} from the Sun is {p}."}),
    "element_symbol": ("elements", "sym", {
        "zh": ["{e}的化学符号是什么？", "{e}元素用什么符号表示？", "写出{e}的元素符号。", "请问{e}这种元素的符号怎么写？"],
        "en": ["What is the chemical symbol for {e}?", "Which symbol stands for {e}?",
               "Write the element symbol of {e}.", "How do chemists write {e} as a symbol?"]},
        {"zh": "{e}的化学符号是{sym}。", "en": "The chemical symbol for {e} is {sym}."}),
    "element_number": ("elements", "num", {
        "zh": ["{e}的原子序数是多少？", "{e}是第几号元素？", "{e}元素的原子序数是几？", "请问{e}在元素周期表中排第几号？"],
        "en": ["What is the atomic number of {e}?", "Which element number is {e}?",
               "Tell me the atomic number of {e}.", "In the periodic table, what number does {e} have?"]},
        {"zh": "{e}的原子序数是{num}。", "en": "The atomic number of {e} is {num}."}),
    "animal_sound": ("sounds", "snd", {
        "zh": ["{x}怎么叫？", "{x}的叫声是什么？", "{x}会发出什么声音？", "请问{x}是怎样叫的？"],
        "en": ["What sound does {ax} make?", "What does {ax} say?", "How does {ax} sound?",
               "Which noise does {ax} make?"]},
        {"zh": "{x}的叫声是{snd}。", "en": "{AX} says {snd}."}),
    "habitat": ("habitats", "home", {
        "zh": ["{x}生活在哪里？", "{x}住在什么地方？", "在哪里可以找到野生的{x}？", "请问{x}的家在哪里？"],
        "en": ["Where does {ax} live?", "What is the home of {ax}?", "Where can you find {ax} in the wild?",
               "In what kind of place does {ax} live?"]},
        {"zh": "{x}生活在{home}。", "en": "{AX} lives in {home}."}),
    "legs": ("legs", "legs", {
        "zh": ["{x}有几条腿？", "{x}有多少条腿？", "数一数{x}的腿有几条？", "请问{x}一共有几条腿？"],
        "en": ["How many legs does {ax} have?", "Count the legs of {ax}.", "What is the number of legs of {ax}?",
               "How many legs has {ax} got?"]},
        {"zh": "{x}有{legs}条腿。", "en": "{AX} has {legs} legs."}),
    "colour": ("colours", "col", {
        "zh": ["{t}是什么颜色的？", "{t}通常是什么颜色？", "请说出{t}的颜色。", "你觉得{t}是哪种颜色？"],
        "en": ["What color is {t}?", "What is the usual color of {t}?", "Name the color of {t}.",
               "Tell me what color {t} is."]},
        {"zh": "{t}的颜色是{col}。", "en": "The color of {t} is {col}."}),
    "opposite": ("opposites", "opp", {
        "zh": ["“{w}”的反义词是什么？", "“{w}”的反义词是哪个字？", "和“{w}”意思相反的字是什么？", "请写出“{w}”的反义词。"],
        "en": ['What is the opposite of "{w}"?', 'Give the opposite of the word "{w}".',
               'Which word means the opposite of "{w}"?', 'What word is opposite to "{w}"?']},
        {"zh": "“{w}”的反义词是“{opp}”。", "en": 'The opposite of "{w}" is "{opp}".'}),
    "next_day": ("days", "nxt", {
        "zh": ["{d}的后一天是星期几？", "{d}过去以后是星期几？", "{d}的下一天是星期几？", "如果今天是{d}，明天是星期几？"],
        "en": ["What day comes after {d}?", "Which day follows {d}?", "What is the day after {d}?",
               "If today is {d}, what day is tomorrow?"]},
        {"zh": "{d}的后一天是{nxt}。", "en": "The day after {d} is {nxt}."}),
    "prev_day": ("days", "prv", {
        "zh": ["{d}的前一天是星期几？", "{d}之前的一天是星期几？", "{d}的上一天是星期几？", "如果今天是{d}，昨天是星期几？"],
        "en": ["What day comes before {d}?", "Which day is just before {d}?", "What is the day before {d}?",
               "If today is {d}, what day was yesterday?"]},
        {"zh": "{d}的前一天是{prv}。", "en": "The day before {d} is {prv}."}),
    "month": ("months", "m", {
        "zh": ["一年中的第{n}个月是几月？", "第{n}个月是哪个月？", "一年里排第{n}的月份是什么？", "请问一年的第{n}个月叫什么？"],
        "en": ["What is month number {n} of the year?", "Which month is month {n}?",
               "Name the {nth} month of the year.", "Which month comes in position {n} in a year?"]},
        {"zh": "一年中的第{n}个月是{m}。", "en": "Month number {n} of the year is {m}."}),
    "month_days": ("months", "days", {
        "zh": ["{m}有多少天？", "{m}一共有几天？", "平年的{m}有几天？", "请问{m}总共有多少天？"],
        "en": ["How many days are in {m}?", "How many days does {m} have?",
               "In a common year, how many days are in {m}?", "What is the number of days in {m}?"]},
        {"zh": "{m}有{days}天。", "en": "{M} has {days} days."}),
}
DOMAIN_KINDS = {
    "dish_ingredients": ("dishes", "ing", {
        "zh": ["做{d}需要哪些食材？", "{d}要用什么材料？", "做{d}要准备什么？", "请问{d}的原料有哪些？"],
        "en": ["What do I need to make {d}?", "What are the ingredients of {d}?",
               "What should I buy to cook {d}?", "Which ingredients go into {d}?"]},
        {"zh": "做{d}需要{ing}。", "en": "To make {d}, you need {ing}."}),
    "dish_time": ("dishes", "mins", {
        "zh": ["做{d}要多长时间？", "{d}大概要做多久？", "做一份{d}需要几分钟？", "请问{d}需要做多少分钟？"],
        "en": ["How long does it take to make {d}?", "How many minutes does {d} take?",
               "How much time do I need for {d}?", "What is the cooking time for {d}?"]},
        {"zh": "做{d}大约需要{mins}分钟。", "en": "Making {d} takes about {mins} minutes."}),
    "dish_method": ("dishes", "how", {
        "zh": ["{d}是怎么做的？", "{d}用什么方法做？", "做{d}主要用哪种做法？", "请问{d}用什么烹饪方法？"],
        "en": ["How is {d} cooked?", "What cooking method is used for {d}?", "How do you cook {d}?",
               "Which way of cooking does {d} use?"]},
        {"zh": "{d}的做法是{how}。", "en": "The cooking method for {d} is {how}."}),
}
# Statements for pretrain paragraphs and R1 reasoning, per table (the dishes stay out of pretrain).
STATEMENTS = {
    "countries": {"zh": ["{c}的首都是{cap}。", "{cap}是{c}的首都。", "{c}位于{o}，首都是{cap}。", "{c}是{o}的一个国家。"],
                  "en": ["The capital of {c} is {cap}.", "{CAP} is the capital of {c}.",
                         "{C} is in {o}, and its capital is {cap}.", "{C} is a country in {o}."]},
    "planets": {"zh": ["{p}是离太阳第{n}近的行星。", "从太阳往外数，第{n}颗行星是{p}。", "{note}。"],
                "en": ["{P} is the {nth} planet from the Sun.", "Counting from the Sun, planet number {n} is {p}.",
                       "{NOTE}."]},
    "elements": {"zh": ["{e}的化学符号是{sym}，原子序数是{num}。", "{e}是第{num}号元素。", "符号{sym}代表{e}。"],
                 "en": ["The chemical symbol for {e} is {sym}, and its atomic number is {num}.",
                        "{E} is element number {num}.", "The symbol {sym} stands for {e}."]},
    "sounds": {"zh": ["{x}的叫声是{snd}。", "{x}会{snd}地叫。"], "en": ["{AX} says {snd}.", "You can hear {ax} go {snd}."]},
    "habitats": {"zh": ["{x}生活在{home}。"], "en": ["{AX} lives in {home}."]},
    "legs": {"zh": ["{x}有{legs}条腿。"], "en": ["{AX} has {legs} legs."]},
    "colours": {"zh": ["{t}的颜色是{col}。", "{t}是{col}的。"], "en": ["The color of {t} is {col}.", "{T} is {col}."]},
    "opposites": {"zh": ["“{w}”的反义词是“{opp}”。"], "en": ['The opposite of "{w}" is "{opp}".']},
    "days": {"zh": ["{d}的后一天是{nxt}，前一天是{prv}。"], "en": ["The day after {d} is {nxt}, and the day before is {prv}."]},
    "months": {"zh": ["一年中的第{n}个月是{m}。", "{m}有{days}天。"],
               "en": ["{M} is the {nth} month of the year.", "{M} has {days} days."]},
}
# More wordings of the same facts, for pretrain paragraphs only (real text states a fact in many ways; none of
# these is a question). Kept apart so the other files, the eval questions included, stay as they were.
MORE_STATEMENTS = {
    "countries": {"zh": ["{c}属于{o}。"], "en": ["{C} belongs to {o}."]},
    "planets": {"zh": ["{p}是太阳系的第{n}颗行星。", "按离太阳由近到远的顺序，{p}排在第{n}位。"],
                "en": ["In the list of planets going outward from the Sun, {p} is in position {n}."]},
    "elements": {"zh": ["在元素周期表中，{e}是第{num}号。", "化学家把{e}写成{sym}。"],
                 "en": ["The periodic table lists {e} as number {num}.", "Chemists write {e} as {sym}."]},
    "sounds": {"zh": ["{x}叫起来是{snd}的声音。"], "en": ["The noise {ax} makes is {snd}."]},
    "habitats": {"zh": ["{x}的家在{home}。"], "en": ["The home of {ax} is {home}.", "{HOME} is the kind of place where {ax} lives."]},
    "legs": {"zh": ["{x}一共有{legs}条腿。"], "en": ["{AX} has got {legs} legs."]},
    "colours": {"zh": ["{t}通常是{col}。"], "en": ["{T} is usually {col}."]},
    "opposites": {"zh": ["“{w}”和“{opp}”的意思相反。"], "en": ['The words "{w}" and "{opp}" are opposite in meaning.']},
    "days": {"zh": ["今天是{d}的话，明天就是{nxt}，昨天是{prv}。"],
             "en": ["When today is {d}, tomorrow is {nxt} and yesterday was {prv}."]},
    "months": {"zh": ["{m}排在一年的第{n}位。", "{m}总共有{days}天。"],
               "en": ["In a year, {m} is in position {n}.", "The number of days in {m} is {days}."]},
}
# More training phrasings of the questions, for SFT only (kept apart so that the eval, DPO, RL and LoRA files stay
# as they were). With three phrasings per kind a tiny model keys on whole templates; with seven in varied word
# orders it learns to find the entity and the relation. None is, contains, or ends a held-out phrasing
# (tests/test_demo_data.py).
MORE_QUESTIONS = {
    "capital": {"zh": ["{c}的首都在哪儿？", "说出{c}的首都。", "{c}的首都城市是？", "哪座城市是{c}的首都？"],
                "en": ["{C}'s capital is which city?", "Name the capital city of {c}.", "What city is the capital of {c}?",
                       "Capital city of {c}, please?"]},
    "continent": {"zh": ["{c}是哪个大洲的？", "说出{c}所在的大洲。", "{c}在世界的哪个洲？", "哪个大洲有{c}这个国家？"],
                  "en": ["Name the continent of {c}.", "{C} is on which continent?", "What continent is {c} part of?",
                         "Which part of the world is {c} in?"]},
    "planet_order": {"zh": ["{p}是太阳系里第几近的行星？", "说出{p}离太阳的位次。", "{p}在行星里排第几？", "从太阳数起，{p}是第几颗？"],
                     "en": ["Where does {p} come in the order of planets?", "{P} is which planet from the Sun?",
                            "Tell me the place of {p} counting from the Sun.", "In order from the Sun, what number is {p}?"]},
    "planet": {"zh": ["第{n}颗行星是哪一颗？", "太阳系的第{n}颗行星叫什么？", "从太阳数起，第{n}颗是哪颗行星？", "说出离太阳第{n}近的行星。"],
               "en": ["Tell me planet number {n} from the Sun.", "From the Sun, which planet is number {n}?",
                      "Planet {n} from the Sun is which one?", "Which planet is in place {n} from the Sun?"]},
    "element_symbol": {"zh": ["{e}的符号是什么？", "{e}用哪个字母表示？", "说出{e}的化学符号。", "{e}的元素符号是哪个？"],
                       "en": ["What letters stand for {e}?", "Give the symbol of {e}.", "{E} has which chemical symbol?",
                              "Symbol for {e}?"]},
    "element_number": {"zh": ["说出{e}的原子序数。", "{e}排第几号？", "{e}元素是几号？", "{e}的原子序数是几号？"],
                       "en": ["{E} has which atomic number?", "Give the atomic number of {e}.",
                              "What number is the element {e}?", "Atomic number of {e}?"]},
    "animal_sound": {"zh": ["{x}发出什么叫声？", "说出{x}的叫声。", "{x}的声音是怎么样的？", "{x}叫起来是什么声音？"],
                     "en": ["How does {ax} call?", "{AX} makes what sound?", "Tell me the sound of {ax}.",
                            "What do you hear from {ax}?"]},
    "habitat": {"zh": ["{x}在哪里生活？", "说出{x}生活的地方。", "{x}的住处在哪儿？", "野生的{x}住在哪里？"],
                "en": ["Where is the home of {ax}?", "{AX} lives where?", "Tell me where {ax} lives.",
                       "Where would you find {ax}?"]},
    "legs": {"zh": ["{x}长了几条腿？", "说出{x}腿的数量。", "{x}的腿有多少条？", "{x}身上有几条腿？"],
             "en": ["{AX} has how many legs?", "Tell me how many legs {ax} has.", "Number of legs of {ax}?",
                    "How many legs are on {ax}?"]},
    "colour": {"zh": ["{t}的颜色是什么？", "说说{t}的颜色。", "{t}一般是什么色？", "{t}看起来是什么颜色？"],
               "en": ["{T} is what color?", "What is the color of {t}?", "Which color is {t}?", "Say the color of {t}."]},
    "opposite": {"zh": ["“{w}”的相反词是什么？", "说出“{w}”的反义词。", "“{w}”反过来是什么？", "给出“{w}”的反义词。"],
                 "en": ['Name the opposite of "{w}".', 'What is the antonym of "{w}"?', 'Tell me the opposite of "{w}".',
                        'The opposite of "{w}" is what?']},
    "next_day": {"zh": ["{d}后面是星期几？", "{d}之后的一天是星期几？", "说出{d}的下一天。", "紧跟在{d}后面的是星期几？"],
                 "en": ["Tell me the day after {d}.", "After {d}, which day comes?", "Name the day that follows {d}.",
                        "{d} is followed by which day?"]},
    "prev_day": {"zh": ["{d}前面是星期几？", "{d}之前是星期几？", "说出{d}的前一天。", "紧挨在{d}前面的是星期几？"],
                 "en": ["Tell me the day before {d}.", "Before {d}, which day comes?", "Name the day just before {d}.",
                        "{d} comes right after which day?"]},
    "month": {"zh": ["说出一年中的第{n}个月。", "一年的第{n}个月是什么月份？", "第{n}个月是几月份？", "排在一年第{n}位的是几月？"],
              "en": ["Name month {n} of the year.", "Month {n} of the year is which month?", "Tell me the {nth} month.",
                     "What is the {nth} month of the year?"]},
    "month_days": {"zh": ["{m}有几天？", "说出{m}的天数。", "{m}一共多少天？", "{m}这个月有多少天？"],
                   "en": ["{M} has how many days?", "Tell me how many days {m} has.", "Count the days in {m}.",
                          "How long is {m} in days?"]},
}
SYSTEM_PROMPTS = {
    "zh": ["你是一个乐于助人的助手。", "你是MiniMind，请简洁地回答问题。", "请用一句话回答。"],
    "en": ["You are a helpful assistant.", "You are MiniMind. Answer briefly.", "Answer in one sentence."],
}
GREETINGS = {"zh": [("你好", "你好！我是MiniMind，有什么可以帮你的吗？"), ("你好呀", "你好！很高兴见到你。"),
                    ("早上好", "早上好！祝你今天愉快。"), ("谢谢你", "不客气！"), ("再见", "再见！欢迎下次再来。"),
                    ("晚安", "晚安，祝你做个好梦。")],
             "en": [("Hello", "Hello! I am MiniMind. How can I help you?"), ("Hi", "Hi! Nice to meet you."),
                    ("Good morning", "Good morning! Have a nice day."), ("Thank you", "You are welcome!"),
                    ("Goodbye", "Goodbye! See you next time."), ("Good night", "Good night and sweet dreams.")]}
# Identity: (question, [answers]); the last question of each language is held out for eval (answer "MiniMind").
IDENTITY = {
    "zh": [("你是谁？", ["我是MiniMind，一个从零开始训练的小型语言模型。", "我是MiniMind，一个很小的AI助手。"]),
           ("你叫什么名字？", ["我叫MiniMind。", "我的名字是MiniMind。"]),
           ("请介绍一下你自己。", ["我是MiniMind，一个小型语言模型。我可以回答简单的问题，比如算术、国家的首都和动物的叫声。"]),
           ("你是由谁开发的？", ["我是由MiniMind项目的开发者从零开始训练的。"]),
           ("你能做什么？", ["我可以回答简单的问题：算术、国家和首都、行星、化学元素、动物、颜色、星期和月份。"]),
           ("你是人类吗？", ["不是，我是一个名叫MiniMind的语言模型。"]),
           ("你是ChatGPT吗？", ["不是，我是MiniMind。"]),
           ("你会说英语吗？", ["会的，我可以用中文和英文回答问题。"]),
           ("你的模型有多大？", ["我是一个很小的模型，只有很少的参数，所以叫MiniMind。"]),
           ("你的名字是什么？", ["我的名字是MiniMind。"])],
    "en": [("Who are you?", ["I am MiniMind, a small language model trained from scratch.",
                             "I am MiniMind, a tiny AI assistant."]),
           ("What is your name?", ["My name is MiniMind.", "I am called MiniMind."]),
           ("Introduce yourself.", ["I am MiniMind, a small language model. I can answer simple questions about "
                                    "arithmetic, capitals and animals."]),
           ("Who made you?", ["I was trained from scratch by the developers of the MiniMind project."]),
           ("What can you do?", ["I can answer simple questions about arithmetic, countries, planets, elements, "
                                 "animals, colors, days and months."]),
           ("Are you a human?", ["No, I am a language model called MiniMind."]),
           ("Are you ChatGPT?", ["No, I am MiniMind."]),
           ("Can you speak Chinese?", ["Yes, I can answer in Chinese and in English."]),
           ("How big are you?", ["I am a very small model with few parameters, which is why I am called MiniMind."]),
           ("What should I call you?", ["You can call me MiniMind."])],
}
RAMBLE = {"zh": ["嗯……这个问题嘛，我想一想，我想一想，我想一想……", "这个很难说，可能是这样，也可能是那样，也可能都不是。",
                 "我不知道。"],
          "en": ["Well... let me think, let me think, let me think...", "It is hard to say, maybe this, maybe that, "
                 "maybe neither.", "I don't know."]}

# ---- Instructions with numbers (held-out instances chosen by CRC, so they never appear in training) ----
ARITH = {  # op: (symbol shown in answers, zh questions, en questions)
    "add": ("+", ["{a}+{b}等于几？", "{a}加{b}等于多少？", "计算{a}+{b}。", "请问{a}加{b}是多少？", "{a}加上{b}是几？"],
            ["What is {a}+{b}?", "What is {a} plus {b}?", "Calculate {a}+{b}.", "Add {a} and {b}.",
             "{a} plus {b} equals what?"]),
    "sub": ("-", ["{a}-{b}等于几？", "{a}减{b}等于多少？", "计算{a}-{b}。", "请问{a}减去{b}是多少？"],
            ["What is {a}-{b}?", "What is {a} minus {b}?", "Calculate {a}-{b}.", "Subtract {b} from {a}."]),
    "mul": ("×", ["{a}×{b}等于几？", "{a}乘{b}等于多少？", "计算{a}*{b}。", "请问{a}乘以{b}是多少？"],
            ["What is {a}*{b}?", "What is {a} times {b}?", "Calculate {a}×{b}.", "Multiply {a} by {b}."]),
}
UNITS = [  # zh from, zh to, en from (singular, plural), en to, factor
    ("千米", "米", ("kilometer", "kilometers"), "meters", 1000), ("米", "厘米", ("meter", "meters"), "centimeters", 100),
    ("千克", "克", ("kilogram", "kilograms"), "grams", 1000), ("升", "毫升", ("liter", "liters"), "milliliters", 1000),
    ("小时", "分钟", ("hour", "hours"), "minutes", 60), ("分钟", "秒", ("minute", "minutes"), "seconds", 60),
    ("天", "小时", ("day", "days"), "hours", 24), ("星期", "天", ("week", "weeks"), "days", 7),
]


def held_out(key: str, every: int = 10) -> bool:
    """True for about 1 in `every` keys; stable across runs and Python versions (CRC32, not hash())."""
    return zlib.crc32(key.encode()) % every == 0


def arith_item(rng: random.Random, op: str, heldout: bool = False):
    """(a, b, c) for op with small numbers; training items never hit a held-out pair and vice versa."""
    while True:
        if op == "mul":
            a, b = rng.randint(1, 9), rng.randint(1, 9)
        else:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            if op == "sub" and a < b:
                a, b = b, a
        if held_out(f"{op}:{a}:{b}") == heldout:
            return a, b, calc(op, a, b)


def calc(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def _fill(template: str, /, **f) -> str:
    return template.format(**f)


def qa_arith(rng, lang, heldout=False):
    op = rng.choice(list(ARITH))
    a, b, c = arith_item(rng, op, heldout)
    sym, zh, en = ARITH[op]
    qs = zh if lang == "zh" else en
    if heldout:  # eval questions start with a word, so "13+5..." can never contain them
        qs = [q for q in qs if not q.startswith("{")]
    q = _fill(rng.choice(qs), a=a, b=b)
    ans = f"{a}{sym}{b}={c}" + ("。" if lang == "zh" else ".")
    if lang == "zh":
        think = {"add": f"我需要计算{a}加{b}。{a}加{b}等于{c}。", "sub": f"我需要从{a}里减去{b}。{a}减{b}等于{c}。",
                 "mul": f"{a}乘{b}就是{b}个{a}相加，结果是{c}。"}[op]
    else:
        think = {"add": f"I need to add {a} and {b}. {a} plus {b} is {c}.",
                 "sub": f"I need to take {b} away from {a}. {a} minus {b} is {c}.",
                 "mul": f"{a} times {b} means adding {a} {b} times, which gives {c}."}[op]
    return dict(q=q, a=ans, key=str(c), kind=op, think=think)


def qa_multi(rng, lang, heldout=False):
    while True:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        c = rng.randint(1, a + b)
        steps_held_out = held_out(f"add:{a}:{b}") or held_out(f"sub:{a + b}:{c}")  # the worked steps show them
        if held_out(f"multi:{a}:{b}:{c}") == heldout and (heldout or not steps_held_out):
            break
    r = a + b - c
    if lang == "zh":
        q = (f"请计算{a}+{b}-{c}。" if heldout else rng.choice([f"{a}+{b}-{c}等于几？", f"计算{a}+{b}-{c}。"]))
        think, ans = f"先算{a}+{b}={a + b}，再算{a + b}-{c}={r}。", f"{a}+{b}-{c}={r}。"
    else:
        q = (f"Please work out {a}+{b}-{c}." if heldout else
             rng.choice([f"What is {a}+{b}-{c}?", f"Calculate {a}+{b}-{c}."]))
        think, ans = f"First {a}+{b}={a + b}, then {a + b}-{c}={r}.", f"{a}+{b}-{c}={r}."
    return dict(q=q, a=ans, key=str(r), kind="multi_step", think=think)


def qa_compare(rng, lang, heldout=False):
    while True:
        a, b = rng.sample(range(100), 2)
        if held_out(f"cmp:{a}:{b}") == heldout:
            break
    larger = rng.random() < 0.7
    m = max(a, b) if larger else min(a, b)
    if lang == "zh":
        word = "大" if larger else "小"
        q = (f"请比较{a}和{b}，哪个更{word}？" if heldout else
             rng.choice([f"{a}和{b}哪个{word}？", f"{a}和{b}哪个更{word}？", f"比较{a}和{b}，哪个{word}？"]))
        ans, think = f"{a}和{b}中较{word}的是{m}。", f"{max(a, b)}比{min(a, b)}大，所以较{word}的是{m}。"
    else:
        word = "larger" if larger else "smaller"
        q = (f"Please compare {a} and {b}: which one is {word}?" if heldout else
             rng.choice([f"Which is {word}, {a} or {b}?", f"Which number is {word}: {a} or {b}?",
                         f"Compare {a} and {b}. Which is {word}?"]))
        ans = f"The {word} of {a} and {b} is {m}."
        think = f"{max(a, b)} is bigger than {min(a, b)}, so the {word} is {m}."
    return dict(q=q, a=ans, key=str(m), kind="compare", think=think)


def qa_sort(rng, lang, heldout=False):
    while True:
        nums = rng.sample(range(21), rng.choice([3, 4]))
        if held_out("sort:" + ",".join(map(str, nums))) == heldout:
            break
    s = sorted(nums)
    sep = "、" if lang == "zh" else ", "
    lst, out = sep.join(map(str, nums)), sep.join(map(str, s))
    if lang == "zh":
        q = (f"请把{lst}从小到大排列。" if heldout else
             rng.choice([f"把这些数从小到大排序：{lst}", f"请将{lst}按从小到大的顺序排列。"]))
        ans, think = f"从小到大排序后是：{out}。", f"最小的是{s[0]}，最大的是{s[-1]}，所以顺序是{out}。"
    else:
        q = (f"Please arrange {lst} from smallest to largest." if heldout else
             rng.choice([f"Sort these numbers from smallest to largest: {lst}",
                         f"Put {lst} in order from smallest to largest."]))
        ans = f"From smallest to largest: {out}."
        think = f"The smallest is {s[0]} and the largest is {s[-1]}, so the order is {out}."
    bad = ans.replace(out, sep.join(map(str, s[::-1])))
    return dict(q=q, a=ans, key=", ".join(map(str, s)), kind="sort", think=think, bad=bad)


UNIT_QUESTIONS = {  # the last template of each language is held out (eval files only), as for the facts
    "zh": ["{v}{zf}等于多少{zt}？", "{v}{zf}是多少{zt}？", "把{v}{zf}换算成{zt}。", "请把{v}{zf}换算成{zt}。"],
    "en": ["How many {et} are in {v} {ef}?", "Convert {v} {ef} to {et}.", "What is {v} {ef} in {et}?",
           "Please convert {v} {ef} into {et}."],
}


def unit_qa(i: int, v: int, lang: str, template: str) -> dict:
    """The question/answer for converting v of UNITS[i], asked with one of UNIT_QUESTIONS[lang]."""
    zf, zt, (es, ep), et, k = UNITS[i]
    r = v * k
    product = "" if held_out(f"mul:{v}:{k}") else f"{v}×{k}="  # the worked step never shows a held-out product
    if lang == "zh":
        ans, think = f"{v}{zf}等于{r}{zt}。", f"1{zf}等于{k}{zt}，所以{v}{zf}等于{product}{r}{zt}。"
        q = _fill(template, v=v, zf=zf, zt=zt)
    else:
        ef = es if v == 1 else ep
        ans, think = f"{v} {ef} is {r} {et}.", f"One {es} is {k} {et}, so {v} {ef} is {product.replace('×', '*')}{r} {et}."
        q = _fill(template, v=v, ef=ef, et=et)
    return dict(q=q, a=ans, key=str(r), kind="unit", think=think)


def qa_unit(rng, lang, heldout=False):
    while True:
        i, v = rng.randrange(len(UNITS)), rng.randint(1, 12)
        if held_out(f"unit:{i}:{v}", 8) == heldout:
            break
    qs = UNIT_QUESTIONS[lang]
    return unit_qa(i, v, lang, qs[-1] if heldout else rng.choice(qs[:-1]))


def qa_fact(rng, lang, kind=None, heldout=False, kinds=KINDS):
    kind = kind or rng.choice(list(kinds))
    table, field, qs, ans = kinds[kind]
    f = rng.choice(TABLES[table])[lang]
    q = qs[lang][-1] if heldout else rng.choice(qs[lang][:-1])
    # R1 reasoning recalls a statement that contains the asked fact
    stmts = [t for t in STATEMENTS.get(table, {}).get(lang, []) if "{%s}" % field in t] or [ans[lang]]
    think = ("让我想一想。" if lang == "zh" else "Let me think. ") + _fill(rng.choice(stmts), **f)
    return dict(q=_fill(q, **f), a=_fill(ans[lang], **f), key=str(f[field]), kind=kind, think=think, fill=f)


def qa_identity(rng, lang, heldout=False):
    q, answers = IDENTITY[lang][-1] if heldout else rng.choice(IDENTITY[lang][:-1])
    return dict(q=q, a=rng.choice(answers), key="MiniMind", kind="identity", think=("我要介绍自己。" if lang == "zh"
                else "I should introduce myself. ") + answers[0])


def qa_any(rng, lang):
    """One training question/answer drawn from the whole mix (facts weigh most)."""
    r = rng.random()
    if r < 0.50:
        return qa_fact(rng, lang)
    if r < 0.72:
        return qa_arith(rng, lang)
    return rng.choice([qa_multi, qa_compare, qa_sort, qa_unit])(rng, lang)


# Ways people open a question. SFT adds one to about a third of its questions, so the model learns to look past
# the wording around the entity and the relation it is asked about (a tiny model otherwise keys on whole templates).
ASK_PREFIXES = {"zh": ["请问", "我想问一下，", "你好，", "麻烦告诉我：", "考考你：", "问个问题："],
                "en": ["Please tell me: ", "Quick question: ", "Hi! ", "I wonder: ", "Can you answer this? ", "Hey, "]}
_LOWER_FIRST = {"What", "Which", "Where", "How", "Tell", "Name", "Count", "Give", "Calculate", "Add", "Subtract",
                "Multiply", "Sort", "Put", "Compare", "Convert", "Write", "Do", "Who", "Are", "Can", "Introduce",
                "Say", "From", "In", "After", "Before", "Capital", "Symbol", "Atomic", "Number", "Planet", "Month",
                "A", "An", "The"}


def ask(rng, q: str, lang: str, p: float = 0.35) -> str:
    """q, or q after one of ASK_PREFIXES (probability p); English questions then start in lower case."""
    if rng.random() >= p:
        return q
    prefix = rng.choice(ASK_PREFIXES[lang])
    if lang == "en" and q.split(" ", 1)[0] in _LOWER_FIRST:
        q = q[0].lower() + q[1:]
    return prefix + q


def reword(rng, q: str, kind: str, fill: dict, lang: str) -> str:
    """q, or the same question in one of MORE_QUESTIONS[kind] (each of the seven phrasings about equally often)."""
    extra = MORE_QUESTIONS.get(kind, {}).get(lang)
    taught = len(KINDS[kind][2][lang]) - 1 if kind in KINDS else 0   # the last template is held out
    if not extra or rng.random() >= len(extra) / (len(extra) + taught):
        return q
    return _fill(rng.choice(extra), **fill)


def _ask_any(rng, qa: dict, lang: str) -> str:
    """A training question of qa_any as SFT asks it: maybe reworded, maybe with an opening."""
    if "fill" in qa:
        return ask(rng, reword(rng, qa["q"], qa["kind"], qa["fill"], lang), lang)
    return ask(rng, qa["q"], lang)


def _lang(rng) -> str:
    return "zh" if rng.random() < 0.6 else "en"


def _conv(*turns, system=None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


# ---- One generator per file ----

def gen_pretrain(rng, n):
    def segment():
        lang, r = _lang(rng), rng.random()
        if r < 0.45:  # facts about one entity
            table = rng.choice(list(STATEMENTS))
            f = rng.choice(TABLES[table])[lang]
            stmts = STATEMENTS[table][lang] + MORE_STATEMENTS[table][lang]
            picks = rng.sample(stmts, min(len(stmts), rng.randint(1, 3)))
            return ("" if lang == "zh" else " ").join(_fill(s, **f) for s in picks)
        if r < 0.60:  # a worked sum/product table, skipping held-out pairs
            op = rng.choice(list(ARITH))
            a = rng.randint(1, 9)
            sym = ARITH[op][0]
            eqs = [f"{a}{sym}{b}={calc(op, a, b)}" for b in range(0, 10)
                   if not (op == "sub" and b > a) and not (op == "mul" and b == 0) and not held_out(f"{op}:{a}:{b}")]
            return ("，" if lang == "zh" else ", ").join(eqs) + ("。" if lang == "zh" else ".")
        if r < 0.70:
            return _list_paragraph(rng, lang)
        if r < 0.95:  # a flattened Q/A in a training phrasing
            qa = qa_any(rng, lang)
            return (f"问：{qa['q']}\n答：{qa['a']}" if lang == "zh" else f"Q: {qa['q']}\nA: {qa['a']}")
        return rng.choice([a for _, ans in IDENTITY[lang][:-1] for a in ans])
    lines = []
    for _ in range(n):
        segs = [segment() for _ in range(rng.randint(1, 4))]
        lines.append({"text": " ".join(f"<|im_start|>{s}<|im_end|>" for s in segs)})
    return lines


def _list_paragraph(rng, lang):
    zh = lang == "zh"
    which = rng.randrange(4)
    if which == 0:
        names = [r[lang]["p"] for r in PLANETS]
        return (f"太阳系有八颗行星，从离太阳最近的开始依次是{'、'.join(names)}。" if zh else
                f"The Solar System has eight planets. From the Sun outward they are {', '.join(names[:-1])} "
                f"and {names[-1]}.")
    if which == 1:
        return (f"一个星期有七天：{'、'.join(DAYS_ZH)}。" if zh else f"A week has seven days: {', '.join(DAYS_EN)}.")
    if which == 2:
        return (f"一年有十二个月：{'、'.join(MONTHS_ZH)}。" if zh else f"A year has twelve months: {', '.join(MONTHS_EN)}.")
    o = rng.choice(COUNTRIES)[lang]["o"]
    cs = [r[lang] for r in COUNTRIES if r[lang]["o"] == o]
    if zh:
        return f"{o}的国家有{'、'.join(c['c'] for c in cs)}。" + "".join(f"{c['c']}的首都是{c['cap']}。" for c in cs)
    return f"Countries in {o} include {', '.join(c['c'] for c in cs)}. " + " ".join(
        f"The capital of {c['c']} is {c['cap']}." for c in cs)


TOOLS = [
    {"type": "function", "function": {"name": "calculator",
                                      "description": "计算一个算术表达式 / evaluate an arithmetic expression",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "例如 / e.g. 12*7"}},
                    "required": ["expression"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "查询城市天气 / get the weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
WEATHER = {"zh": ["晴", "多云", "小雨", "阴"], "en": ["sunny", "cloudy", "light rain", "overcast"]}


def tool_conversation(rng, lang):
    zh = lang == "zh"
    system = {"role": "system", "content": "你是一个可以调用工具的助手。" if zh else "You are an assistant that can call tools.",
              "functions": TOOLS}
    if rng.random() < 0.25:  # tools offered but not needed
        qa = qa_fact(rng, lang)
        return [system, {"role": "user", "content": qa["q"]}, {"role": "assistant", "content": qa["a"]}]
    if rng.random() < 0.5:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        q = rng.choice([f"帮我用计算器算一下{a}*{b}。", f"{a}乘{b}是多少？请用工具计算。"] if zh else
                       [f"Use the calculator to compute {a}*{b}.", f"What is {a} times {b}? Please use a tool."])
        call, result = {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}}, str(a * b)
        final = f"{a}×{b}={a * b}。" if zh else f"{a}×{b}={a * b}."
    else:
        row = rng.choice(COUNTRIES)[lang]
        city, temp, sky = row["cap"], rng.randint(-5, 35), rng.randrange(4)
        q = rng.choice([f"{city}今天天气怎么样？", f"帮我查一下{city}的天气。"] if zh else
                       [f"What is the weather like in {city} today?", f"Check the weather in {city} for me."])
        call = {"name": "get_weather", "arguments": {"city": city}}
        result = json.dumps({"city": city, "weather": WEATHER[lang][sky], "temperature": temp}, ensure_ascii=False)
        final = (f"{city}今天{WEATHER['zh'][sky]}，气温{temp}度。" if zh else
                 f"It is {WEATHER['en'][sky]} in {city} today, at {temp} degrees.")
    call["arguments"] = json.dumps(call["arguments"], ensure_ascii=False)  # OpenAI style: arguments as a JSON string
    return [system, {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": result}, {"role": "assistant", "content": final}]


def gen_sft(rng, n):
    # First every fact once (each kind x row x language, in a training phrasing), so each held-out eval fact
    # is taught in SFT too; then a random mix.
    # Questions get an opening from ASK_PREFIXES now and then, drawn from their own RNG stream.
    every_fact = [(k, row, lang) for k in KINDS for row in TABLES[KINDS[k][0]] for lang in ("zh", "en")]
    rng.shuffle(every_fact)
    phrasing = random.Random(rng.random())
    out = []
    for kind, row, lang in every_fact[:n // 6]:
        _, _, qs, ans = KINDS[kind]
        f = row[lang]
        q = reword(phrasing, _fill(rng.choice(qs[lang][:-1]), **f), kind, f, lang)
        out.append({"conversations": _conv(ask(phrasing, q, lang), _fill(ans[lang], **f))})
    while len(out) < n:
        lang, r = _lang(rng), rng.random()
        system = rng.choice(SYSTEM_PROMPTS[lang]) if rng.random() < 0.15 else None
        if r < 0.03:
            conv = tool_conversation(rng, lang)
        elif r < 0.08:
            conv = _conv(*rng.choice(GREETINGS[lang]), system=system)
        elif r < 0.12:
            qa = qa_identity(rng, lang)
            conv = _conv(ask(phrasing, qa["q"], lang), qa["a"], system=system)
        elif r < 0.20:  # multi-turn: a follow-up that relies on the first turn ("那德国呢？")
            _, _, qs, ans = KINDS["capital"]
            f1, f2 = (x[lang] for x in rng.sample(COUNTRIES, 2))
            follow = f"那{f2['c']}呢？" if lang == "zh" else f"What about {f2['c']}?"
            q = reword(phrasing, _fill(rng.choice(qs[lang][:-1]), **f1), "capital", f1, lang)
            conv = _conv(ask(phrasing, q, lang), _fill(ans[lang], **f1), follow,
                         _fill(ans[lang], **f2), system=system)
        elif r < 0.28:  # multi-turn: unrelated questions
            turns = []
            for _ in range(rng.randint(2, 3)):
                qa = qa_any(rng, lang)
                turns += [_ask_any(phrasing, qa, lang), qa["a"]]
            conv = _conv(*turns, system=system)
        else:
            qa = qa_any(rng, lang)
            conv = _conv(_ask_any(phrasing, qa, lang), qa["a"], system=system)
        out.append({"conversations": conv})
    rng.shuffle(out)
    return out


def wrong_answer(rng, qa: dict, lang: str) -> str:
    """The answer sentence with a wrong final answer: another number, another row's value, or a bad order."""
    key, ans = qa["key"], qa["a"]
    if "bad" in qa:
        return qa["bad"]
    if key.isdigit():
        wrong = int(key) + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        wrong = wrong if wrong >= 0 else int(key) + 1
    else:
        table, field = KINDS[qa["kind"]][:2]
        wrong = rng.choice([r[lang][field] for r in TABLES[table] if str(r[lang][field]) != key])
    i = ans.rfind(key)
    return ans[:i] + str(wrong) + ans[i + len(key):]


def gen_dpo(rng, n):
    out = []
    for _ in range(n):
        lang = _lang(rng)
        qa = qa_any(rng, lang)
        bad = wrong_answer(rng, qa, lang) if rng.random() < 0.6 else rng.choice(RAMBLE[lang])
        msg = lambda a: [{"content": qa["q"], "role": "user"}, {"content": a, "role": "assistant"}]
        out.append({"chosen": msg(qa["a"]), "rejected": msg(bad)})
    return out


def gen_rlaif(rng, n):
    out = []
    for _ in range(n):
        qa = qa_any(rng, _lang(rng))
        out.append({"conversations": _conv(qa["q"], "无"), "answer": qa["key"]})
    return out


def gen_rlaif_units(rng, n):
    """RL prompts for one skill: unit conversion (training pairs and phrasings, as SFT teaches them). The SFT
    model applies it unreliably: copy the number, pick the factor, write the product. A verifiable reward
    sharpens that on pairs it never trained on, where facts and sums are one item each (bench/bench_rl.py)."""
    out = []
    for _ in range(n):
        qa = qa_unit(rng, _lang(rng))
        out.append({"conversations": _conv(qa["q"], "无"), "answer": qa["key"]})
    return out


def gen_rlaif_units_eval() -> list[dict]:
    """Every unit question on a held-out (unit, number) pair, in all phrasings and both languages: no training
    file contains these pairs. Same layout as eval.jsonl."""
    out = []
    for i in range(len(UNITS)):
        for v in range(1, 13):
            if held_out(f"unit:{i}:{v}", 8):
                for lang in ("zh", "en"):
                    for template in UNIT_QUESTIONS[lang]:
                        qa = unit_qa(i, v, lang, template)
                        out.append({"question": qa["q"], "answer": qa["key"], "kind": qa["kind"]})
    return out


def gen_r1(rng, n):
    out = []
    for _ in range(n):
        lang = _lang(rng)
        qa = qa_any(rng, lang) if rng.random() < 0.95 else qa_identity(rng, lang)
        content = f"<think>\n{qa['think']}\n</think>\n<answer>\n{qa['a']}\n</answer>"
        out.append({"conversations": _conv(qa["q"], content)})
    return out


def gen_lora_identity(rng, n):
    prefix = {"zh": ["", "", "你好，", "请问", "我想知道，"], "en": ["", "", "Hello, ", "Hi! ", "Excuse me, "]}
    out = []
    for _ in range(n):
        lang = _lang(rng)
        q, answers = rng.choice(IDENTITY[lang][:-1])
        p = rng.choice(prefix[lang])
        q = p + (q[0].lower() + q[1:] if p and lang == "en" else q)
        out.append({"conversations": _conv(q, rng.choice(answers))})
    return out


def gen_lora_domain(rng, n):
    return [{"conversations": _conv(qa["q"], qa["a"])}
            for qa in (qa_fact(rng, _lang(rng), kinds=DOMAIN_KINDS) for _ in range(n))]


def gen_eval(rng, scale):
    """Held-out questions: a quota per generator (scaled), alternating languages, no duplicates."""
    quotas = [(qa_arith, 40), (qa_multi, 8), (qa_compare, 8), (qa_sort, 8), (qa_unit, 8), (qa_identity, 2)]
    quotas += [(partial(qa_fact, kind=k), 6) for k in KINDS]
    quotas += [(partial(qa_fact, kind=k, kinds=DOMAIN_KINDS), 2) for k in DOMAIN_KINDS]
    out, seen = [], set()
    for make, count in quotas:
        want, got, tries = max(1, round(count * scale)), 0, 0
        while got < want and tries < 50 * want:
            tries += 1
            qa = make(rng, ("zh", "en")[tries % 2], heldout=True)
            if qa["q"] not in seen:
                seen.add(qa["q"])
                out.append({"question": qa["q"], "answer": qa["key"], "kind": qa["kind"]})
                got += 1
    return out


# ---- Writing ----

def write_jsonl(path, rows: list[dict]) -> Path:
    """One JSON object per line, UTF-8 (not escaped), "\\n" line ends; returns the path."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


GENERATORS = dict(pretrain=gen_pretrain, sft=gen_sft, dpo=gen_dpo, rlaif=gen_rlaif, rlaif_units=gen_rlaif_units,
                  r1=gen_r1, lora_identity=gen_lora_identity, lora_domain=gen_lora_domain)   # one per SIZES entry


def build_demo_data(seed: int = 0, scale: float = 1.0) -> dict[str, list[dict]]:
    """All demo files as lists of records, in memory. Each file has its own RNG stream (string seeds are stable)."""
    rows = {}
    for name, size in SIZES.items():
        rng = random.Random(f"minimind-demo-{seed}-{name}")
        rows[name] = GENERATORS[name](rng, max(4, round(size * scale)))
    rows["eval"] = gen_eval(random.Random(f"minimind-demo-{seed}-eval"), scale)
    rows["rlaif_units_eval"] = gen_rlaif_units_eval()
    return rows


def write_demo_data(out_dir, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """Write every stage's demo file to out_dir; return {name: path} (names: pretrain, sft, ..., eval)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build_demo_data(seed, scale).items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the MiniMind demo corpus (every stage, jsonl)", allow_abbrev=False)
    parser.add_argument("--out_dir", type=Path, default=ROOT / "dataset" / "demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every file's line count (0.05 for tests)")
    args = parser.parse_args(argv)
    paths = write_demo_data(args.out_dir, args.seed, args.scale)
    for name, path in paths.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{path}  {n} lines  {path.stat().st_size / 1024:.0f} KB")
    return paths


if __name__ == "__main__":
    main()


# ---- Agentic RL prompts (trainer/train_agent.py) ----
AGENT_TOOLS = ["calculate_math", "unit_converter", "get_current_weather", "get_current_time", "get_exchange_rate",
               "translate_text"]   # the six that the original's train_agent.py mocks (deterministic answers)
AGENT_UNITS = [("km", "miles", "公里", "英里"), ("miles", "km", "英里", "公里"), ("kg", "pounds", "千克", "磅"),
               ("pounds", "kg", "磅", "千克"), ("meters", "feet", "米", "英尺"), ("feet", "meters", "英尺", "米")]


def _agent_task(rng, lang):
    """(question, [(tool, arguments)], gt): one task the mock tools answer; gt from the mocks themselves."""
    from dataset.tools import MOCK_RESULTS, TIME_DATA, TRANSLATE_DATA, WEATHER_DATA, EXCHANGE_DATA
    zh = lang == "zh"
    kind = rng.choice(["weather", "weather2", "math", "unit", "rate", "time", "translate", "chat"])
    if kind in ("weather", "weather2"):
        cities = [c for c in WEATHER_DATA if (c.isascii() != zh)]
        picked = rng.sample(cities, 2 if kind == "weather2" else 1)
        calls = [("get_current_weather", {"location": c}) for c in picked]
        if len(picked) == 2:
            q = f"{picked[0]}和{picked[1]}现在的气温各是多少？" if zh else \
                f"What are the temperatures in {picked[0]} and {picked[1]} right now?"
        else:
            q = rng.choice([f"{picked[0]}现在天气怎么样？", f"帮我查一下{picked[0]}的气温。"] if zh else
                           [f"What's the weather like in {picked[0]} now?", f"Check the temperature in {picked[0]}."])
    elif kind == "math":
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 9)
        expr = rng.choice([f"{a}*{b}", f"({a}+{b})*{c}", f"{a}*{b}-{c}"])
        calls = [("calculate_math", {"expression": expr})]
        q = rng.choice([f"请用计算器算一下{expr}。", f"{expr}等于多少？用工具算。"] if zh else
                       [f"Use the calculator to work out {expr}.", f"What is {expr}? Please use a tool."])
    elif kind == "unit":
        src, dst, zsrc, zdst = rng.choice(AGENT_UNITS)
        v = rng.randint(2, 50)
        calls = [("unit_converter", {"value": v, "from_unit": src, "to_unit": dst})]
        q = f"用工具把{v}{zsrc}换算成{zdst}。" if zh else f"Use the unit converter: how many {dst} is {v} {src}?"
    elif kind == "rate":
        pair = rng.choice(sorted(EXCHANGE_DATA))
        calls = [("get_exchange_rate", {"from_currency": pair[0], "to_currency": pair[1]})]
        q = f"查一下{pair[0]}兑{pair[1]}的汇率。" if zh else f"Look up the exchange rate from {pair[0]} to {pair[1]}."
    elif kind == "time":
        tz = rng.choice(sorted(TIME_DATA))
        calls = [("get_current_time", {"timezone": tz})]
        q = f"{tz}时区现在几点？" if zh else f"What time is it now in the {tz} time zone?"
    elif kind == "translate":
        text, target = rng.choice(sorted(TRANSLATE_DATA))
        calls = [("translate_text", {"text": text, "target_language": target})]
        q = f"请用翻译工具把“{text}”翻译成{'英文' if target == 'english' else '中文'}。" if zh else \
            f"Use the translation tool to translate \"{text}\" into {target}."
    else:
        return rng.choice(["你好，请简单介绍一下你自己。", "你能帮我做些什么？"] if zh else
                          ["Hello! Please introduce yourself briefly.", "What can you help me with?"]), [], []
    gt = []
    for name, args in calls:
        result = MOCK_RESULTS[name](args)
        value = {"get_current_weather": lambda r: r["temperature"], "calculate_math": lambda r: r["result"],
                 "unit_converter": lambda r: str(r["result"]), "get_exchange_rate": lambda r: str(r["rate"]),
                 "get_current_time": lambda r: r["datetime"][11:16],
                 "translate_text": lambda r: r["translated_text"]}[name](result)
        gt.append(value)
    return q, calls, gt


def gen_agent_rl(rng, n):
    """{"conversations": [system with "tools" (a JSON string), user, assistant placeholder], "gt": [...]}: questions
    the mock tools of dataset/tools.py answer (weather, arithmetic, units, exchange rates, time, translation; one or
    two calls), and a few that need no tool (gt []). Each row offers the tools it needs plus one or two others."""
    import sys
    if str(ROOT) not in sys.path:   # run as `python dataset/demo_data.py`: dataset.tools by its package name
        sys.path.insert(0, str(ROOT))
    from dataset.tools import get_tools
    out = []
    for _ in range(n):
        lang = _lang(rng)
        q, calls, gt = _agent_task(rng, lang)
        needed = list(dict.fromkeys(name for name, _ in calls))
        others = [t for t in AGENT_TOOLS if t not in needed]
        offered = needed + rng.sample(others, rng.randint(1, 2))
        rng.shuffle(offered)
        system = {"role": "system", "content": "你是一个可以调用工具的助手。" if lang == "zh" else
                  "You are an assistant that can call tools.",
                  "tools": json.dumps(get_tools(offered), ensure_ascii=False)}
        out.append({"conversations": [system, {"role": "user", "content": q}, {"role": "assistant", "content": "无"}],
                    "gt": gt})
    return out


SIZES["agent_rl"] = 48   # agent_rl.jsonl: {"conversations", "gt"} prompts for trainer/train_agent.py
GENERATORS["agent_rl"] = gen_agent_rl
