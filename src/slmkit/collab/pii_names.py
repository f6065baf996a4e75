"""Person names by gazetteer: capitalised word runs headed by a known first name.

The classic rule-and-gazetteer approach to name recognition (Mikheev, Moens & Grover 1999,
"Named Entity Recognition without Gazetteers", and the GATE ANNIE gazetteer/JAPE pipeline,
Cunningham et al. 2002): a run of 2-4 capitalised tokens (a middle initial allowed) whose first
token is a known given name is a person, unless one of its tokens names an organisation or
a place (``Henry Hub``, ``North America``); a lone capitalised token is a person when it is a
known given name that is not also a common word, month, weekday or place (``Connie``, but
not ``May``, ``Will`` or ``Austin``). Given names come from Faker's person providers for
the locales in :data:`LOCALES` (``pip install faker``; Faker's catch-all ``en`` list is left
out: it holds words such as ``French``, ``Captain`` and ``Hill``), so no model is needed.

Without Faker the gazetteer is empty and :func:`lexicon_names` finds nothing (one warning).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
import re

log = logging.getLogger(__name__)

#: Faker person locales whose given names are read (Latin-script names of Europe and the Americas, India)
LOCALES = ("en_US", "en_GB", "en_IE", "en_CA", "en_AU", "en_NZ", "en_IN", "de_DE", "de_AT", "de_CH", "fr_FR", "fr_CA",
           "fr_CH", "es_ES", "es_MX", "es_CO", "it_IT", "nl_NL", "nl_BE", "pt_PT", "pt_BR", "pl_PL", "sv_SE", "no_NO",
           "da_DK", "fi_FI", "cs_CZ", "hu_HU", "ro_RO", "hi_IN", "fil_PH")
#: English short forms of given names that name lists often lack
NICKNAMES = frozenset("""
Al Andy Barb Becky Ben Beth Betsy Bob Bobby Cathy Charlie Chris Chuck Cindy Dan Danny Dave Deb Debbie Dick Doug
Ed Eddie Fred Greg Hank Jake Jeff Jen Jenny Jerry Jim Jimmy Joe Jon Josh Kate Kathy Katie Ken Kenny Kim Larry Len
Les Liz Lou Matt Meg Mick Mike Mikey Nate Pete Peggy Phil Ray Rick Ricky Rob Robbie Rod Ron Ronnie Russ Sally Sam
Scotty Stan Steve Sue Susie Ted Teddy Terry Tim Tom Tommy Tony Trish Val Vic Vicky Vince Walt Wally Bert Bud Butch
""".split())

_TOKEN = r"(?:[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?|[A-Z]\.)"
#: runs of capitalised tokens on one line (a single space or a space after an initial between them)
RUN = re.compile(rf"(?<![\w@.-]){_TOKEN}(?: {_TOKEN}){{0,3}}(?![\w@-])")

#: given names that are also everyday words, months, weekdays, places or titles: never a name alone
AMBIGUOUS = frozenset("""
Will May June April August Hope Faith Grace Joy Mark Bill Frank Grant Chase Rose Dawn Art Guy Ray Rich Sky
Summer Autumn Amber Crystal Iris Lily Ruby Pearl Penny Sandy Carol Christian Earl Royal Major Price Young
Can North South East West Star Sun Moon River Forest Glen Dale Lane Hunter Page Case Bay Cliff Gay Don Long
Miles Neil Pat Sue Max Gene Will Jan Mar Per Van Von Lee Rod Bob Nick Tom Drew Wade Reed Ward Bishop Dean
Duke King Prince Baron Knight Judge Marshall Sergeant General Colonel Houston Dallas Austin Texas America
Jordan Georgia Virginia Carolina Florida Alexandria Dakota Montana Nevada Indiana Tennessee Florence Paris London Sydney Chelsea Camden Devon Kent Lincoln Madison
Orlando Phoenix Savannah Victoria Washington Trenton Eugene Denver Berlin Vienna Asia Africa India China
Israel Santiago Adelaide Brooklyn Sharon Christmas Easter Monday Tuesday Wednesday Thursday Friday Saturday
Sunday January February March September October November December Enron Energy Power Gas Please Thanks Dear
German Marine French English British American Spanish Italian Dutch Captain Admiral Colonel Lieutenant
Hello Good Best Regards Sincerely Call Send Let Our The This That Then There They When Where What Why How
""".split())
#: tokens that turn a capitalised run into an organisation, product or place
NOT_PERSON = frozenset("""
Bank Hub Inc Corp Corporation Company Co Ltd Llc Plc Group Partners Capital Energy Power Gas Oil Services
Systems Solutions Technologies University College School Institute Hospital Center Centre Street
Avenue Road Boulevard Drive County City State States Republic Kingdom Union Council Committee Board
Department Ministry Agency Association Foundation Trust Fund Securities Holdings Industries International
Global National Federal American European North South East West Pipeline Exchange Market Markets Airlines
Airport Hotel Club Church Team Office Desk Floor Building Tower Station Project Program Fund Report Deal
Contract Invoice Agreement Subject Re Fw Fwd Attn Attention Dear Hi Hello Thanks Regards Best Sincerely Cheers
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August
September October November December Houston Texas America Square Garden Brigade Corps Division Regiment
Battalion Army Navy Force Fleet Squadron Motor Motors Gun High Island Islands Bay Beach River Lake Mountain Valley
Canyon Marine Brigadier General Colonel Major Captain Sergeant Admiral Commander Lieutenant Corporal Private
""".split())
#: a capitalised run right after one of these is part of a place name (St. Lucie, San Antonio, São Paulo)
PLACE_PREFIX = re.compile(r"(?:\b(?:St|Ste|Saint|San|Santa|São|Fort|Port|Lake|Mount|Mt|Cape|New|Crewe)\.?|&) $")


@functools.cache
def given_names() -> frozenset[str]:
    """Given names of every Faker locale (capitalised ASCII words only), cached per process."""
    try:
        import faker.providers.person as person
    except ImportError:
        log.warning("faker is not installed: the name gazetteer is empty (pip install faker)")
        return frozenset()
    names: set[str] = set()
    shipped = {m.name for m in pkgutil.iter_modules(person.__path__)}
    for loc in (x for x in LOCALES if x in shipped):
        try:
            provider = importlib.import_module(f"{person.__name__}.{loc}").Provider
        except (ImportError, AttributeError):
            continue
        for attr in ("first_names", "first_names_male", "first_names_female"):
            vals = getattr(provider, attr, ())
            if isinstance(vals, (dict, list, tuple, set, frozenset)):
                names.update(v for v in vals if isinstance(v, str) and re.fullmatch(r"[A-Z][a-z]+", v))
    return frozenset(names | NICKNAMES)


def lexicon_names(text: str) -> list[str]:
    """Person names in ``text`` by the rules in the module docstring (each distinct name once)."""
    first = given_names()
    if not first:
        return []
    out: list[str] = []
    for m in RUN.finditer(text):
        if PLACE_PREFIX.search(text, max(0, m.start() - 8), m.start()):
            continue
        toks = m.group().split(" ")
        # drop leading words that cannot start a name ("Dear", "Call", "The" at a sentence start)
        while toks and (toks[0] not in first or toks[0] in NOT_PERSON):
            toks = toks[1:]
        while toks and toks[-1].endswith("."):  # a trailing initial is a sentence end, not part of the name
            toks = toks[:-1]
        if not toks or any(t in NOT_PERSON for t in toks):
            continue
        if len(toks) == 1 and toks[0] in AMBIGUOUS:
            continue
        name = " ".join(toks)
        if name not in out:
            out.append(name)
    return out
