"""The built-in Chinese story corpus: short children's stories in Chinese, offline and deterministic.

The Chinese sibling of tinyllama.data.synthetic, drawn the same way (one random stream per
(seed, index), the same paragraph layout) but written in Chinese rather than translated: every
story is one plot filled with a hero and a friend (a child, or an animal with its measure word:
一只小猫, 一条金鱼, 一匹小马), a home, an outing, a loved object, feelings and dialogue in
Chinese quotation marks (“……”) with 。！？ and an ending. All of the text is written for this
project. A tiny model trained on it for a few minutes learns what it can see: names that
recur, measure words that agree with their nouns, quotes that close, stories that end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List

from tinyllama.data.synthetic import paragraphs, story_rng

GIRLS = [
    "小美",
    "小红",
    "丽丽",
    "朵朵",
    "甜甜",
    "小雨",
    "小雪",
    "月月",
    "芳芳",
    "婷婷",
    "圆圆",
    "安安",
    "小花",
    "悠悠",
    "晶晶",
    "彤彤",
    "思思",
    "妞妞",
    "小燕",
    "小兰",
    "苗苗",
    "静静",
    "佳佳",
    "萌萌",
    "琪琪",
    "笑笑",
    "小荷",
    "小梅",
    "贝贝",
    "娜娜",
    "小米",
    "露露",
    "青青",
    "小玉",
    "飘飘",
    "欣欣",
]
BOYS = [
    "小明",
    "小刚",
    "大宝",
    "豆豆",
    "壮壮",
    "明明",
    "小虎",
    "小龙",
    "天天",
    "亮亮",
    "小宇",
    "阳阳",
    "小杰",
    "东东",
    "浩浩",
    "小飞",
    "石头",
    "小山",
    "冬冬",
    "小川",
    "牛牛",
    "磊磊",
    "小峰",
    "跳跳",
    "涛涛",
    "小海",
    "乐乐",
    "小勇",
    "多多",
    "果果",
    "小鹏",
    "强强",
    "小林",
    "毛毛",
    "团团",
    "虎子",
]
# (animal, its measure word): the model has to learn which measure word goes with which noun.
ANIMALS = [
    ("小猫", "只"),
    ("小狗", "只"),
    ("小兔子", "只"),
    ("小熊", "只"),
    ("小狐狸", "只"),
    ("小鸭子", "只"),
    ("小老鼠", "只"),
    ("猫头鹰", "只"),
    ("小青蛙", "只"),
    ("小猪", "头"),
    ("小羊", "只"),
    ("小乌龟", "只"),
    ("小松鼠", "只"),
    ("小马", "匹"),
    ("小山羊", "只"),
    ("小鹿", "头"),
    ("小刺猬", "只"),
    ("小鸟", "只"),
    ("小象", "头"),
    ("小狮子", "头"),
    ("小猴子", "只"),
    ("大熊猫", "只"),
    ("小企鹅", "只"),
    ("小老虎", "只"),
    ("小鲸鱼", "头"),
    ("长颈鹿", "只"),
    ("小斑马", "匹"),
    ("小骆驼", "头"),
    ("小浣熊", "只"),
    ("小袋鼠", "只"),
    ("鹦鹉", "只"),
    ("大白鹅", "只"),
    ("小螃蟹", "只"),
    ("小蜗牛", "只"),
    ("小蜜蜂", "只"),
    ("小牛", "头"),
    ("小绵羊", "只"),
    ("小毛驴", "头"),
    ("小鸡", "只"),
    ("小狼", "匹"),
    ("小河马", "头"),
    ("小鳄鱼", "条"),
    ("小海豚", "条"),
    ("小金鱼", "条"),
    ("小鲤鱼", "条"),
]
TRAITS = [
    "勇敢",
    "害羞",
    "好奇",
    "善良",
    "快乐",
    "聪明",
    "温柔",
    "调皮",
    "开朗",
    "安静",
    "友好",
    "勤劳",
    "活泼",
    "细心",
    "可爱",
    "热心",
    "诚实",
    "有礼貌",
    "耐心",
    "机灵",
    "淘气",
    "懂事",
    "贪吃",
    "爱笑",
    "爱唱歌",
    "爱画画",
    "爱干净",
    "慢吞吞",
    "乖巧",
    "大方",
    "认真",
    "爱幻想",
    "胆小",
    "倔强",
    "幽默",
]
# Where the hero lives: a place phrase that follows 在 or 住在.
PLACES = [
    "森林边的一座小房子里",
    "一个有红色谷仓的大农场里",
    "海边一个安静的小镇上",
    "公园里一棵高高的大树上",
    "小山坡下一个暖和的洞里",
    "山里的一个小村子里",
    "一座热闹的大城市里",
    "河边的一间小木屋里",
    "长长的街道上一座蓝色的房子里",
    "一个开满鲜花的花园里",
    "雪山脚下的一间小木屋里",
    "长满高草的池塘边",
    "小溪边的一座老磨坊里",
    "学校旁边的一座黄色房子里",
    "岩石小岛上的一座灯塔里",
    "沙漠边上的一顶帐篷里",
    "高高的橡树上的一个鸟窝里",
    "面包店楼上的一套小房子里",
    "一座灰色石头砌成的城堡里",
    "苹果树下的一个地洞里",
    "丛林里的一座树屋里",
    "竹林深处的一座小竹楼里",
    "江南水乡的一座小石桥边",
    "草原上的一座蒙古包里",
    "金黄的麦田中间的一座农舍里",
    "一条热闹的老胡同里",
]
# Outings: (where one goes, 去X; where one is, 在X).
OUTINGS = [
    ("公园", "公园里"),
    ("海边", "海边"),
    ("森林", "森林里"),
    ("集市", "集市上"),
    ("湖边", "湖边"),
    ("动物园", "动物园里"),
    ("小山上", "小山上"),
    ("图书馆", "图书馆里"),
    ("花园", "花园里"),
    ("游乐场", "游乐场上"),
    ("河边", "河边"),
    ("草地上", "草地上"),
    ("农场", "农场里"),
    ("面包店", "面包店里"),
    ("田野里", "田野里"),
    ("山洞", "山洞里"),
    ("池塘边", "池塘边"),
    ("博物馆", "博物馆里"),
    ("码头", "码头上"),
    ("果园", "果园里"),
    ("游泳池", "游泳池边"),
    ("马戏团", "马戏团里"),
    ("庙会", "庙会上"),
    ("火车站", "火车站"),
    ("小岛上", "小岛上"),
    ("山谷里", "山谷里"),
    ("瀑布边", "瀑布边"),
    ("村口的广场", "村口的广场上"),
    ("玩具店", "玩具店里"),
    ("海洋馆", "海洋馆里"),
    ("菜园", "菜园里"),
    ("老桥边", "老桥边"),
    ("竹林", "竹林里"),
]
# Modifiers that go before a thing: 一个红皮球, 一只毛茸茸的玩具熊.
LOOKS = [
    "红色的",
    "蓝色的",
    "绿色的",
    "黄色的",
    "白色的",
    "黑色的",
    "粉红色的",
    "紫色的",
    "橙色的",
    "金色的",
    "银色的",
    "棕色的",
    "灰色的",
    "天蓝色的",
    "亮晶晶的",
    "软软的",
    "带条纹的",
    "大大的",
    "小小的",
    "旧旧的",
    "崭新的",
    "带斑点的",
    "毛茸茸的",
    "闪闪发光的",
    "彩色的",
    "漂亮的",
]
COLORS = [
    "红色的",
    "蓝色的",
    "绿色的",
    "黄色的",
    "白色的",
    "粉红色的",
    "紫色的",
    "橙色的",
    "金黄色的",
    "天蓝色的",
]
# (measure word, thing).
THINGS = [
    ("个", "皮球"),
    ("只", "风筝"),
    ("顶", "帽子"),
    ("本", "图画书"),
    ("辆", "玩具车"),
    ("个", "布娃娃"),
    ("面", "小鼓"),
    ("条", "小船"),
    ("个", "气球"),
    ("只", "玩具熊"),
    ("条", "围巾"),
    ("个", "机器人"),
    ("盒", "蜡笔"),
    ("条", "毯子"),
    ("个", "杯子"),
    ("盒", "拼图"),
    ("个", "口哨"),
    ("把", "雨伞"),
    ("列", "小火车"),
    ("个", "小水桶"),
    ("支", "笛子"),
    ("张", "地图"),
    ("盏", "灯笼"),
    ("个", "指南针"),
    ("颗", "弹珠"),
    ("个", "溜溜球"),
    ("根", "羽毛"),
    ("条", "项链"),
    ("个", "篮子"),
    ("把", "小铲子"),
    ("把", "小提琴"),
    ("架", "望远镜"),
    ("个", "笔记本"),
    ("支", "画笔"),
    ("个", "书包"),
    ("个", "枕头"),
    ("副", "手套"),
    ("个", "手镯"),
    ("个", "陀螺"),
    ("块", "滑板"),
    ("把", "小号"),
    ("面", "小旗子"),
    ("条", "丝带"),
    ("把", "钥匙"),
    ("个", "闹钟"),
    ("颗", "鹅卵石"),
    ("个", "水晶球"),
    ("个", "音乐盒"),
    ("顶", "王冠"),
    ("根", "魔法棒"),
    ("个", "贝壳"),
    ("双", "小靴子"),
]
FOODS = [
    "苹果",
    "饼干",
    "面包",
    "蛋糕",
    "胡萝卜",
    "蜂蜜",
    "奶酪",
    "玉米",
    "葡萄",
    "桃子",
    "草莓",
    "香蕉",
    "梨",
    "橘子",
    "樱桃",
    "饺子",
    "南瓜",
    "土豆",
    "西瓜",
    "核桃",
    "包子",
    "月饼",
    "粽子",
    "糖葫芦",
    "馒头",
    "花生",
    "红薯",
    "柿子",
    "汤圆",
    "李子",
    "蓝莓",
    "芒果",
]
# What the hero makes (and how it cooks), and what goes in it: 草莓蛋糕, 南瓜饺子.
BAKES = [
    ("蛋糕", "放进烤箱里烤"),
    ("饼干", "放进烤箱里烤"),
    ("包子", "放进蒸笼里蒸"),
    ("饺子", "下到锅里煮"),
    ("月饼", "放进烤箱里烤"),
    ("馅饼", "放进平底锅里煎"),
    ("汤圆", "下到锅里煮"),
    ("花卷", "放进蒸笼里蒸"),
    ("松饼", "放进烤箱里烤"),
    ("煎饼", "放进平底锅里煎"),
]
FILLINGS = ["草莓", "蜂蜜", "苹果", "红豆", "南瓜", "巧克力", "芝麻", "香蕉", "核桃", "桂花", "蓝莓", "枣泥"]
WEATHER = [
    "阳光暖暖的，天空很明亮。",
    "天空灰蒙蒙的，飘着很多云。",
    "一阵凉风吹过树林。",
    "大雪把地面盖得像一条白色的毯子。",
    "那是一个下雨的早晨。",
    "小鸟在树上唱着歌。",
    "红色和金色的树叶从树上飘落下来。",
    "空气里有青草的香味。",
    "春天来了，小河里的冰化了。",
    "夏天到了，知了在树上叫个不停。",
]
GOOD = ["开心", "高兴", "骄傲", "兴奋", "满足", "快乐", "幸福", "温暖"]
BAD = ["难过", "害怕", "担心", "伤心", "孤单", "生气", "紧张", "委屈", "失落", "着急"]
SAD = ["难过", "伤心", "失落", "着急"]  # feelings of waiting, losing, failing
FEAR = ["害怕", "紧张", "担心"]  # feelings of a storm, a noise, a stage
SAID = ["说", "说", "说", "小声说", "回答", "笑着说", "轻轻地说", "认真地说"]
ASKED = ["问", "问", "好奇地问", "小声问"]
EXCLAIMED = ["说", "大声说", "喊道", "叫了起来"]
OPENINGS = [
    "从前，有一{m}{trait}的{kind}，名叫{name}。",
    "从前，在{place}，住着一{m}{trait}的{kind}，{ta}的名字叫{name}。",
    "有一天，{trait}的{kind}{name}一大早就醒了。",
    "很久很久以前，{place}住着一{m}{trait}的{kind}，叫{name}。",
    "{name}是一{m}{trait}的{kind}，住在{place}。",
    "在{place}，有一{m}{trait}的{kind}，大家都叫{ta}{name}。",
]
ENDINGS = [
    "从此以后，他们一直是最好的朋友。",
    "从那天起，{name}再也不{bad}了。",
    "{name}笑着睡着了，心里甜甜的。",
    "那天晚上，{name}梦见了{out}。",
    "这一天，{name}永远也不会忘记。",
    "{name}已经等不及下一次冒险了。",
    "{name}心想：明天又会发生什么有趣的事呢？",
]


@dataclass
class Role:
    name: str
    kind: str  # "小女孩", "小男孩" or an animal
    m: str  # measure word of the kind: 个, 只, 条, 匹, 头
    ta: str  # 她, 他 or 它 (animals)

    @property
    def title(self) -> str:
        """How a friend is introduced: 小狗豆豆 for an animal, the name alone for a child."""
        return self.name if self.ta != "它" else self.kind + self.name


def _role(rng: random.Random, avoid: str = "", animal_share: float = 0.4) -> Role:
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    while name == avoid:
        name = rng.choice(GIRLS if girl else BOYS)
    if rng.random() < animal_share:
        kind, m = rng.choice(ANIMALS)
        return Role(name, kind, m, "它")
    return Role(name, "小女孩" if girl else "小男孩", "个", "她" if girl else "他")


def _say(rng: random.Random, who: Role, words: str) -> str:
    """One line of dialogue; the verb fits the punctuation, the tag goes before, after or
    between the quoted sentences: 豆豆说：“……” / “……，”豆豆说。 / “……，”豆豆说，“……”"""
    verb = rng.choice(ASKED if words.endswith("？") else EXCLAIMED if words.endswith("！") else SAID)
    first, _, rest = words.partition("。")
    form = rng.random()
    if rest and form < 0.3:
        return f"“{first}，”{who.name}{verb}，“{rest}”"
    if form < 0.6:
        quote = words[:-1] + "，" if words.endswith("。") else words
        return f"“{quote}”{who.name}{verb}。"
    return f"{who.name}{verb}：“{words}”"


def _feel(rng: random.Random, who: str, feeling: str) -> str:
    return rng.choice([f"{who}觉得很{feeling}。", f"{who}心里很{feeling}。", f"{who}感到非常{feeling}。"])


# Each plot takes the story's slots and returns its sentences. Slots: h (hero), f (friend),
# m + thing (measure word, object), look, color, color2, food, bake + cook, filling,
# out + out_at (an outing), good, bad, sad, fear (feelings).
Plot = Callable[[random.Random, Dict], List[str]]


def _lost(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"有一天，{h.name}带着自己那{s['m']}{s['look']}{s['thing']}去{s['out']}玩。",
        f"{h.ta}一直玩到太阳快落山。等{h.ta}回过头来，{s['thing']}不见了！",
        _feel(rng, h.name, s["bad"]),
        _say(rng, h, f"我的{s['thing']}去哪儿了？"),
        f"一{f.m}{f.kind}看见了{h.ta}，走了过来。{f.ta}叫{f.name}。",
        _say(rng, f, "别担心。我来帮你一起找。"),
        "他们找遍了树丛下面，又翻了翻石头后面。",
        f"最后，{f.name}在一片大叶子底下找到了{s['thing']}。",
        _say(rng, h, f"谢谢你，{f.name}！你真是我的好朋友。"),
        f"{h.name}又笑了起来，他们一起玩到了吃晚饭的时候。",
    ]


def _share(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}有一{s['m']}{s['look']}{s['thing']}，{h.ta}特别喜欢它。",
        f"有一天，{f.title}来找{h.name}玩。",
        _say(rng, f, f"我可以玩一玩你的{s['thing']}吗？"),
        f"{h.name}不想分享。{h.ta}把{s['thing']}紧紧抱在怀里，说：“不行，这是我的！”",
        f"{f.name}听了，难过地走开了。",
        f"没过多久，{h.name}心里也不好受了。一个人玩一点儿也没意思。",
        f"{h.ta}追上了{f.name}。",
        _say(rng, h, f"对不起。我们一起玩我的{s['thing']}吧。"),
        f"{f.name}笑了。两个人轮流玩，比一个人玩开心多了。",
    ]


def _bake(rng, s):
    h, f = s["h"], s["f"]
    dish = s["filling"] + s["bake"]
    return [
        f"{h.name}想给妈妈做一样特别的东西。",
        _say(rng, h, f"我要做{dish}！"),
        f"{h.ta}请{f.title}来帮忙。",
        f"他们把面粉、水和{s['filling']}都准备好，一起忙了起来。{f.name}不小心把面粉撒了一地，两个人都哈哈大笑。",
        f"然后，他们把{s['bake']}{s['cook']}，耐心地等着。",
        "没过多久，厨房里就飘满了香喷喷的味道。",
        f"妈妈回到家，看见了桌上的{dish}。",
        _say(rng, Role("妈妈", "妈妈", "位", "她"), "真是个惊喜！谢谢你们！"),
        _feel(rng, h.name, s["good"]),
        "为爱的人亲手做一样东西，就是最好的礼物。",
    ]


def _storm(rng, s):
    h, f = s["h"], s["f"]
    return [
        "一天夜里，来了一场大暴雨。风呼呼地刮着，雨点噼里啪啦地打在窗户上。",
        f"{h.name}很{s['fear']}，{h.ta}躲进了被子里。",
        _say(rng, h, "我不喜欢这么响的声音。"),
        f"{h.ta}的好朋友{f.title}走过来，紧紧地挨着{h.ta}坐下。",
        _say(rng, f, "雷声虽然很响，可是我们在屋子里很安全。我们来讲故事吧，一直讲到雨停。"),
        f"{f.name}讲了一个故事，说的是一{s['m']}会飞的{s['thing']}。",
        f"{h.name}听得入了迷，忘记了外面的雷声。",
        "第二天早上，太阳出来了，天空又干净又蓝。",
        f"{h.name}不再{s['fear']}了。{h.ta}觉得又{s['good']}又勇敢。",
    ]


def _race(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}和{f.name}都喜欢跑步。有一天，他们去了{s['out']}。",
        _say(rng, f, "我们来比赛吧，看谁先跑到那棵大树下！"),
        "“预备——跑！”两个人用最快的速度向前冲去。",
        f"跑到一半，{f.name}摔了一跤，膝盖磕破了。",
        f"{h.name}本来可以赢，可是{h.ta}停下来，跑了回去。",
        _say(rng, h, "你没事吧？我扶你起来。"),
        "他们肩并肩，一起慢慢走到了大树下。",
        _say(rng, f, "你是世界上最好的朋友。"),
        _feel(rng, h.name, s["good"]),
        f"{h.ta}明白了，帮助朋友比赢得比赛更重要。",
    ]


def _seed(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}在{s['out_at']}捡到了一颗小小的种子。",
        _say(rng, h, "这颗种子会长成什么呢？"),
        f"{h.ta}把它种在花盆里，每天都给它浇水。",
        f"一天又一天过去了，什么也没有长出来。{h.name}很{s['sad']}。",
        _say(rng, f, "别着急。好东西都需要时间。"),
        f"于是{h.name}继续等待，继续给它浇水。",
        f"一天早上，{h.ta}看见土里冒出了一棵绿绿的小芽！小芽长啊长，越长越高。",
        f"不久，它开出了一朵{s['color']}花，有{h.ta}的手掌那么大。",
        f"{h.name}把花拿给{f.name}看，两个人心里都很{s['good']}。",
    ]


def _noise(rng, s):
    h, f = s["h"], s["f"]
    kind, m = rng.choice(ANIMALS)  # the visitor is always an animal, named like the friend
    return [
        f"一天夜里，{h.name}听见一阵奇怪的声音。沙沙，沙沙，沙沙！",
        f"{h.name}很{s['fear']}。",
        _say(rng, h, "是谁在那儿？"),
        f"{h.ta}拿起一盏小台灯，往门后面看了看。",
        f"原来是一{m}{kind}，名叫{f.name}，正在找{s['food']}吃。",
        _say(rng, Role(f.name, kind, m, "它"), "对不起，吓到你了。我实在太饿了。"),
        f"{h.name}笑了，拿了一些{s['food']}给{f.name}吃。",
        f"从那天晚上起，他们成了好朋友，{f.name}每天都来看{h.ta}。",
    ]


def _trip(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"今天是个特别的日子。{h.name}要和家人一起去{s['out']}。",
        f"{h.ta}带上了自己那{s['m']}{s['look']}{s['thing']}，还带了一些{s['food']}。",
        f"在{s['out_at']}，{h.name}遇见了{f.title}。",
        _say(rng, f, "你想和我一起去探险吗？"),
        f"他们看见了一只{s['color2']}蝴蝶、一根长长的树枝，还有一个像星星一样的小水坑。",
        f"他们一起分享了{s['food']}，还唱了好多歌。",
        f"该回家了，{h.name}挥了挥手。",
        _say(rng, h, "下次见！"),
        f"回家的路上，{h.name}虽然很累，但是很{s['good']}。",
    ]


def _birthday(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"今天是{h.name}的生日，{h.ta}一大早就醒了，心里美滋滋的。",
        f"可是一上午，谁也没有对{h.ta}说生日快乐。{h.name}渐渐{s['sad']}起来。",
        f"下午，{f.title}请{h.ta}一起去{s['out']}。",
        "他们一到那里，所有的朋友都跳了出来，大声喊：“生日快乐！”",
        f"那里有一个{s['filling']}大蛋糕，还有一{s['m']}用彩纸包好的{s['look']}{s['thing']}。",
        _say(rng, h, "原来你们都没有忘记！"),
        _say(rng, f, "我们想给你一个惊喜。"),
        f"{h.name}和每个人都拥抱了一下。这是{h.ta}过得最开心的一个生日。",
    ]


def _lesson(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}想学骑自己那辆{s['color']}自行车。",
        f"{h.ta}刚骑上去就摔了下来。{h.ta}又试了一次，又摔倒了。",
        _say(rng, h, "我学不会！"),
        f"{h.name}很{s['sad']}，想要放弃。",
        f"这时，{f.title}走了过来。",
        _say(rng, f, "每个人一开始都会摔跤。再试一次吧，我帮你扶着车。"),
        f"{h.name}深深地吸了一口气，又试了一次。这一次，{h.ta}没有摔倒！",
        f"{h.ta}一直骑到{s['out']}，又骑了回来。",
        _say(rng, h, "我做到了！"),
        f"{h.name}明白了：只要多试几次，就会越来越好。",
    ]


def _help(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"有一天，{h.name}看见{f.title}一个人坐在路边。",
        _say(rng, h, "你为什么这么难过？"),
        _say(rng, f, f"我本来要去{s['out']}，可是走着走着就迷路了。现在我找不到家了。"),
        f"{h.name}想帮助{f.name}。{h.ta}对这一带的路很熟悉。",
        f"他们穿过一扇{s['color']}大门，又走过一座小桥。",
        f"终于，他们看见了{f.name}的家。{f.ta}的妈妈正站在门口等着。",
        _say(rng, f, "谢谢你帮助我！"),
        _feel(rng, h.name, s["good"]),
        "一件小小的好事，也能带来很大的改变。",
    ]


def _snow(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}早上醒来，发现外面白茫茫的一片。下了一整夜的雪！",
        _say(rng, h, f"{f.name}，快来！我们一起堆雪人吧！"),
        "他们先滚了一个大雪球做身子，又滚了一个小一点儿的做脑袋。",
        f"{f.name}找来两颗小石子当眼睛，{h.name}把自己那条{s['color']}围巾给雪人围上。",
        "过了一会儿，他们的手指冻得冰凉，鼻子也冻得红红的。",
        _say(rng, f, "我的脚趾头快冻僵了。我们进屋去好不好？"),
        "奶奶给他们端来两杯热乎乎的牛奶。",
        f"他们慢慢地喝着，隔着结了霜的窗户看着自己的雪人，心里{s['good']}极了。",
    ]


def _treasure(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}在一本落满灰尘的旧书里发现了一张藏宝图。",
        _say(rng, h, f"{f.name}，快看！地图上画着一个叉，宝藏就在{s['out']}附近。"),
        f"他们带上一把小铲子、一个手电筒和一些{s['food']}，沿着弯弯曲曲的小路出发了。",
        "他们爬过倒下的树枝，又踮着脚走过滑溜溜的石头。",
        f"在一棵歪脖子柳树旁边，{f.name}指着地面说：“就在这儿挖！”",
        "他们挖呀挖，直到铲子碰到了一个硬邦邦的东西。是一个木头箱子！",
        f"箱子里没有金子，只有一{s['m']}{s['look']}{s['thing']}和一张纸条，上面写着：朋友才是真正的宝藏。",
        _say(rng, f, "说得真对呀。"),
        f"{h.name}咧开嘴笑了，他们一起把箱子抬回了家。",
    ]


def _music(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"村里要开音乐会了。{h.name}想上台唱一首歌，可是{h.ta}很{s['fear']}。",
        _say(rng, h, "要是我在大家面前唱错了怎么办？"),
        f"每天下午，{h.ta}都和{f.name}一起练习。{f.name}在旁边拍着手，跟着哼曲子。",
        "音乐会那天晚上，灯笼亮了起来，长凳上坐满了邻居。",
        f"{h.name}的手在发抖。{h.ta}唱错了一个音，可还是接着唱了下去。",
        "一曲唱完，台下的人们拍手欢呼。",
        _say(rng, f, "你唱得太棒了！根本没人听出来。"),
        f"{h.name}向大家鞠了一躬，心里{s['good']}极了。勇敢不是从来不害怕，而是害怕了也不放弃。",
    ]


def _rescue(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"{h.name}在{s['out']}附近散步的时候，听到了一声细细的叫声。",
        "原来是一只小鸟从窝里掉了下来，正在草丛里发抖。",
        _say(rng, h, "可怜的小家伙。我们得帮帮它。"),
        f"{f.title}去拿了一块软软的布，{h.name}轻轻地把小鸟捧了起来。",
        "他们一起爬上梯子，把小鸟放回了窝里，让它回到哥哥姐姐的身边。",
        "鸟妈妈飞了回来，叽叽喳喳地叫个不停，好像在说谢谢。",
        f"{h.name}和{f.name}站在树下静静地看着，心里很{s['good']}。",
        f"从那以后，每年春天，小鸟们都会在{h.name}的窗外唱歌。",
    ]


def _kite(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"春天到了，{h.name}和{f.title}拿着一只{s['color']}风筝去{s['out']}。",
        _say(rng, f, "风来了！快跑，快跑！"),
        f"{h.name}拉着线往前跑，风筝一点一点飞了起来。",
        "可是风越来越大，风筝线一下子挂在了一根高高的树枝上。",
        f"{h.name}很{s['sad']}，眼圈都红了。",
        _say(rng, f, "别哭。我们一起想办法。"),
        f"{f.name}找来一根长竹竿，{h.name}踮起脚，轻轻地把线拨了下来。",
        f"风筝又飞上了天，飞得比小鸟还高。{h.name}和{f.name}高兴得跳了起来。",
    ]


def _moon(rng, s):
    h, f = s["h"], s["f"]
    return [
        f"中秋节到了，{h.name}家的院子里摆满了{s['filling']}月饼和水果。",
        f"{h.name}请{f.title}来一起赏月。",
        _say(rng, h, "月亮今天怎么这么圆呀？"),
        _say(rng, Role("奶奶", "奶奶", "位", "她"), "中秋的月亮最圆。月亮圆了，一家人也要团团圆圆。"),
        f"{f.name}小声说，{f.ta}的家在很远的地方，{f.ta}有一点儿想家。",
        f"{h.name}把最大的一块月饼分给了{f.name}。",
        _say(rng, h, "今天我们就是一家人。"),
        f"{f.name}咬了一口月饼，甜甜地笑了。两个人坐在月光下，心里都很{s['good']}。",
    ]


PLOTS: List[Plot] = [
    _lost,
    _share,
    _bake,
    _storm,
    _race,
    _seed,
    _noise,
    _trip,
    _birthday,
    _lesson,
    _help,
    _snow,
    _treasure,
    _music,
    _rescue,
    _kite,
    _moon,
]


def generate_story(seed: int, index: int) -> str:
    """Story number `index` of the Chinese corpus with this seed (a pure function of both)."""
    rng = story_rng(seed, index)
    hero = _role(rng)
    friend = _role(rng, avoid=hero.name)
    m, thing = rng.choice(THINGS)
    color, color2 = rng.sample(COLORS, 2)
    out, out_at = rng.choice(OUTINGS)
    bake, cook = rng.choice(BAKES)
    slots = dict(
        h=hero,
        f=friend,
        m=m,
        thing=thing,
        look=rng.choice(LOOKS),
        color=color,
        color2=color2,
        food=rng.choice(FOODS),
        bake=bake,
        cook=cook,
        filling=rng.choice(FILLINGS),
        out=out,
        out_at=out_at,
        good=rng.choice(GOOD),
        bad=rng.choice(BAD),
        sad=rng.choice(SAD),
        fear=rng.choice(FEAR),
    )
    fill = dict(
        name=hero.name,
        kind=hero.kind,
        m=hero.m,
        ta=hero.ta,
        trait=rng.choice(TRAITS),
        place=rng.choice(PLACES),
        out=out,
        bad=slots["bad"],
    )
    opening = [rng.choice(OPENINGS).format(**fill)]
    if rng.random() < 0.5:
        opening.append(rng.choice(WEATHER))
    if rng.random() < 0.5:
        opening.append(f"{hero.ta}最喜欢自己那{m}{slots['look']}{thing}。")
    middle = rng.choice(PLOTS)(rng, slots)
    end = rng.choice(ENDINGS).format(**fill)
    return paragraphs(rng, opening, middle, end, space="")
