"""The story tasks' world: names, places, events, items and sentence templates.

Sizes follow docs/reference_behaviour.md section 5.5 (49 characters, 64 locations, 20 events, 18 item
adjectives, 15 materials, 21 item types) because the sample RNG draws from them. Each
template ends with a space and may use the fields ``{protagonist}``, ``{location}``,
``{event}``, ``{character}`` and ``{item}``; only the buying and selling templates name
an item.
"""

PROTAGONIST = "Arion"

CHARACTERS = (
    "Aldric", "Brisa", "Caelan", "Dorine", "Edmar", "Fenna", "Galen", "Hesper", "Ilvar", "Jorun",
    "Kestra", "Lucan", "Mirela", "Noric", "Orsolya", "Pellam", "Quenby", "Rosalind", "Soren", "Tamsin",
    "Ulric", "Vanya", "Wendel", "Xanthe", "Yorick", "Zelda", "Ambrose", "Beatrix", "Cyprian", "Delphine",
    "Evander", "Flavia", "Gideon", "Honora", "Isidore", "Jessamy", "Leopold", "Marisol", "Nerys", "Osric",
    "Perpetua", "Radomir", "Sabina", "Thaddeus", "Ursula", "Valerian", "Wilhelmina", "Ysolde", "Zoltan",
)

LOCATIONS = (
    "Amberfall", "Briarwood", "Copperhollow", "Duskmere", "Eastmarch", "Fernvale", "Glimmerford",
    "Hollowbrook", "Ironcrest", "Juniper Landing", "Kingsbarrow", "Larkspur Bay", "Millhaven",
    "Northwatch", "Oakenshaw", "Pebblecombe", "Quarry End", "Ravenscar", "Saltmarsh", "Thornbury",
    "Upper Wexley", "Valewood", "Westerholm", "Yarrowdale", "Ashcombe", "Bramblegate", "Cinderwell",
    "Deepwater Cove", "Elmstead", "Foxglove Hill", "Greystone", "Highmoor", "Ivybridge Crossing",
    "Kettleby", "Lantern Rock", "Marrowgate", "Nettlefield", "Owlthorpe", "Pinecliff", "Redwater",
    "Stillbrook", "Tidewell", "Underhill", "Velvet Reach", "Whistledown", "Wyvern Point", "Applecross",
    "Blackmere", "Coldharbour", "Driftwood Quay", "Emberlee", "Frostholm", "Goldmoor", "Heronsgate",
    "Inkwell Abbey", "Juniper Falls", "Kilnworth", "Lowmarsh", "Moonfield", "Nightingale Wharf",
    "Oxbow Ferry", "Pennyroyal", "Rookhaven", "Silverdell",
)

EVENTS = (
    "the spring fair", "the lantern parade", "the grain auction", "the midsummer games",
    "the river regatta", "the wool market", "the founders' feast", "the horse show",
    "the apple harvest", "the winter bazaar", "the bell-ringing contest", "the weavers' guild meeting",
    "the kite festival", "the cheese tasting", "the boat blessing", "the chess tournament",
    "the flower show", "the bonfire night", "the storytellers' evening", "the first frost market",
)

ITEM_ADJECTIVES = (
    "gilded", "weathered", "fancy", "delicate", "sturdy", "polished", "battered", "gleaming",
    "carved", "dusty", "slender", "heavy", "painted", "tarnished", "graceful", "rustic", "tiny", "striped",
)

ITEM_MATERIALS = (
    "oak", "brass", "pewter", "walnut", "tin", "ebony", "glass", "leather", "bone", "cedar",
    "iron", "copper", "marble", "silver", "clay",
)

ITEM_TYPES = (
    "compass", "music box", "hourglass", "lantern", "flute", "chess set", "spyglass", "teapot",
    "candlestick", "jewellery box", "bowl", "mirror", "inkwell", "bell", "dagger", "comb",
    "goblet", "locket", "clock", "statuette", "chest",
)

SCENE_INTRO = (
    "{protagonist} arrived in {location} just as the morning mist was lifting. ",
    "The road brought {protagonist} to {location} late in the afternoon. ",
    "After a long ride, {protagonist} reached the gates of {location}. ",
    "{protagonist} stepped off the cart in the middle of {location}. ",
    "It was raining softly when {protagonist} walked into {location}. ",
    "{protagonist} came over the last hill and saw {location} spread out below. ",
    "By the time {protagonist} entered {location}, the streets were already busy. ",
    "A cold wind followed {protagonist} all the way into {location}. ",
)

REASON = (
    "{protagonist} had come to see the sights that travellers spoke about. ",
    "{protagonist} was looking for a quiet place to rest for a few days. ",
    "A letter from an old friend had asked {protagonist} to visit. ",
    "{protagonist} hoped to find something unusual to bring home. ",
    "Curiosity, more than any plan, had led {protagonist} here. ",
    "{protagonist} had heard that the town's craftspeople were the best in the region. ",
    "{protagonist} needed a break from the long journey. ",
    "A map bought years ago had marked this town with a small star, and {protagonist} wanted to know why. ",
)

EVENT_TEMPLATES = (
    "The whole town was getting ready for {event}. ",
    "Posters everywhere announced {event}. ",
    "Everyone in {location} seemed to be talking about {event}. ",
    "Music drifted from the square, where {event} was about to begin. ",
    "By luck, the visit fell on the day of {event}. ",
    "Stalls and ribbons filled the streets for {event}. ",
    "Crowds from nearby villages had come for {event}. ",
    "Nobody could remember a year when {event} had drawn so many people. ",
)

CHAR_INTRO = (
    "There {protagonist} met a trader called {character}. ",
    "A friendly merchant named {character} waved {protagonist} over. ",
    "Near the fountain, {protagonist} got talking with {character}, who kept a small shop. ",
    "{character}, a seller with a loud laugh, greeted {protagonist} warmly. ",
    "In a narrow lane, {protagonist} came across the stall of {character}. ",
    "A shopkeeper by the name of {character} invited {protagonist} inside. ",
    "{protagonist} was soon chatting with {character}, who sold curiosities. ",
    "An old acquaintance of many travellers, {character}, offered {protagonist} a seat. ",
)

CONVERSATION_EXTENSION = (
    "They talked about the weather and the state of the roads. ",
    "{character} told a long story about a flood many years ago. ",
    "{protagonist} asked about the best place to eat in town. ",
    "They laughed about a goat that had wandered into the market. ",
    "{character} complained about the rising price of candles. ",
    "{protagonist} described the places visited so far on the journey. ",
    "They agreed that the local bread was excellent. ",
    "{character} pointed out a tower that was said to be haunted. ",
    "{protagonist} listened to gossip about the town council. ",
    "They shared a pot of tea while the crowd went by. ",
    "{character} asked where {protagonist} planned to travel next. ",
    "They argued in good humour about which season was the finest. ",
)

BUYING = (
    "Before leaving, {protagonist} bought a {item} from {character}. ",
    "{protagonist} paid a fair price for a {item}. ",
    "{character} sold {protagonist} a {item} after some friendly haggling. ",
    "{protagonist} could not resist a {item} and bought it on the spot. ",
    "After much thought, {protagonist} purchased a {item}. ",
    "{protagonist} left the stall as the new owner of a {item}. ",
    "{character} wrapped up a {item} that {protagonist} had just bought. ",
    "{protagonist} handed over some coins and took home a {item}. ",
)

SELLING = (
    "{protagonist} also sold the {item} to {character}. ",
    "To lighten the luggage, {protagonist} sold the {item}. ",
    "{character} gladly bought the {item} that {protagonist} no longer needed. ",
    "{protagonist} parted with the {item} for a good sum. ",
    "{protagonist} traded away the {item} before moving on. ",
    "The {item} found a new owner when {protagonist} sold it to {character}. ",
    "{protagonist} decided the {item} had travelled far enough and sold it. ",
    "{character} offered a fine price for the {item}, and {protagonist} agreed to sell it. ",
)

FAREWELL = (
    "{protagonist} thanked {character} and said goodbye. ",
    "With a wave, {protagonist} left {character} to the next customer. ",
    "{character} wished {protagonist} a safe road ahead. ",
    "They shook hands, and {protagonist} went on. ",
    "{protagonist} promised {character} to come back one day. ",
    "{character} walked {protagonist} to the end of the street. ",
    "{protagonist} bid {character} farewell as the bells rang. ",
    "Saying goodbye took a while, as {character} had one more story to tell. ",
)

CONCLUSION = (
    "That night {protagonist} slept well at a small inn. ",
    "{protagonist} left {location} the next morning. ",
    "The visit to {location} would be remembered fondly. ",
    "{protagonist} watched the sunset before heading to bed. ",
    "The day ended with a simple supper by the fire. ",
    "{protagonist} wrote a few lines about {location} in a travel journal. ",
    "Tired but content, {protagonist} rested until dawn. ",
    "{protagonist} was on the road again before the town woke up. ",
)

EXTRA = (
    "The stars were unusually bright that evening. ",
    "Somewhere a dog barked until midnight. ",
    "A light rain fell during the night. ",
    "The innkeeper's cat kept {protagonist} company. ",
    "Far away, thunder rolled over the hills. ",
    "The smell of wood smoke hung in the air. ",
    "An owl called from the trees outside the window. ",
    "The wind rattled the shutters now and then. ",
)
