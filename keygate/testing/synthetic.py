"""Synthetic Japanese records for tests and benchmarks: deterministic, and never real people.

``SyntheticRecords(seed)`` produces resident (住民記録), tax (個人住民税) and My Number (個人番号)
records that validate under the shipped ``policies/``, plus opaque byte strings for benchmarks.
The same seed always gives the same output, independent of the machine, ``PYTHONHASHSEED`` or which
other methods were called before.

How the data is made:

- People come in households (世帯) of one to five: a 世帯主, perhaps a spouse (妻/夫) and children
  (子) who share the surname, the address, the 世帯番号 and the 本籍.  The *i*-th record of
  ``resident`` and of ``mynumber`` is the same person; ``tax`` covers the adults among the same
  people, so the three join on 個人番号.
- Names are kanji/kana *pairs* from Faker's ja_JP person provider (``last_name_pairs``,
  ``first_name_male_pairs``, ``first_name_female_pairs``), so 氏名 "山田 太郎" always comes with
  氏名カナ "ヤマダ タロウ".  Surnames follow Faker's frequency weights.
- Addresses are 都道府県 + a real 市区町村 (with its real 全国地方公共団体コード) + a town name
  from Faker's ja_JP address provider + random 丁目・番・号.  The town is not one of that
  municipality's, so the address does not exist.  The 郵便番号 starts with digits used in that
  municipality; the last four are random.
- My Numbers have valid check digits and are unique within one generator (an affine permutation of
  the eleven-digit space).  No range is reserved for test numbers, so one may coincide with a
  number really issued to someone; none is derived from a real person.  住民票コード are unique
  random eleven-digit strings (their own check digit is not modelled).
- Dates are relative to :data:`REFERENCE_DATE`, not today, so output does not change over time.
- Tax amounts follow the 個人住民税 arithmetic in outline: 総所得金額 drawn from a log-normal
  distribution, 基礎控除 ¥430,000, 扶養控除 ¥330,000 a dependant, social insurance about 14 %,
  所得割 6 % (市町村) and 4 % (道府県) plus 均等割 ¥3,000 and ¥1,000, the 非課税 thresholds of
  a 1級地.  調整控除, 指定都市 rates and the 森林環境税 are left out.

Everything is sampled from small in-memory pools with one :class:`random.Random` per stream:
100,000 records take 2–3 seconds on one (slow, shared) development core.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from typing import Final, NamedTuple, TypeAlias, TypeVar

from faker.providers.address.ja_JP import Provider as _FakerAddress
from faker.providers.person.ja_JP import Provider as _FakerPerson

from keygate.policy.mynumber import mynumber_check_digit

__all__ = ["REFERENCE_DATE", "JsonScalar", "SyntheticRecords"]

_T = TypeVar("_T")

JsonScalar: TypeAlias = str | int | float | bool | None

#: the "today" of all synthetic data
REFERENCE_DATE: Final = date(2025, 4, 1)
#: 個人番号カード were first issued in January 2016
_FIRST_CARD_ISSUE: Final = date(2016, 1, 1)
_ELEVEN_DIGITS: Final = 10**11

_Municipality: TypeAlias = tuple[str, str, str, tuple[str, ...]]

#: (都道府県, 市区町村, 全国地方公共団体コード, first three digits of its 郵便番号)
_MUNICIPALITIES: Final[tuple[_Municipality, ...]] = (
    ("北海道", "札幌市中央区", "011011", ("060", "064")),
    ("北海道", "函館市", "012025", ("040", "041", "042")),
    ("東京都", "千代田区", "131016", ("100", "101", "102")),
    ("東京都", "中央区", "131024", ("103", "104")),
    ("東京都", "港区", "131032", ("105", "106", "107", "108")),
    ("東京都", "新宿区", "131041", ("160", "161", "162", "169")),
    ("東京都", "文京区", "131059", ("112", "113")),
    ("東京都", "世田谷区", "131121", ("154", "155", "156", "157", "158")),
    ("東京都", "渋谷区", "131130", ("150", "151")),
    ("東京都", "練馬区", "131202", ("176", "177", "178", "179")),
    ("東京都", "江戸川区", "131237", ("132", "133", "134")),
    ("東京都", "八王子市", "132012", ("192", "193")),
    ("東京都", "町田市", "132098", ("194", "195")),
    ("神奈川県", "横浜市西区", "141038", ("220",)),
    ("神奈川県", "横浜市港北区", "141097", ("222", "223")),
    ("神奈川県", "川崎市中原区", "141330", ("211",)),
    ("神奈川県", "相模原市中央区", "141526", ("252",)),
    ("神奈川県", "藤沢市", "142051", ("251", "252")),
    ("新潟県", "新潟市中央区", "151033", ("950", "951")),
    ("大阪府", "豊中市", "272035", ("560", "561")),
    ("大阪府", "吹田市", "272051", ("564", "565")),
    ("兵庫県", "神戸市中央区", "281107", ("650", "651")),
    ("兵庫県", "姫路市", "282014", ("670", "671", "672")),
    ("兵庫県", "西宮市", "282049", ("662", "663")),
    ("奈良県", "奈良市", "292010", ("630", "631")),
    ("和歌山県", "和歌山市", "302015", ("640", "641")),
    ("沖縄県", "那覇市", "472018", ("900", "901", "902")),
    ("沖縄県", "石垣市", "472077", ("907",)),
    ("沖縄県", "浦添市", "472085", ("901",)),
)

_LAST_NAMES: Final = tuple(_FakerPerson.last_name_pairs)
_LAST_NAME_CUM_WEIGHTS: Final = tuple(
    sum(tuple(_FakerPerson.last_name_pairs.values())[: i + 1]) for i in range(len(_LAST_NAMES))
)
_MALE_FIRST_NAMES: Final = tuple(_FakerPerson.first_name_male_pairs)
_FEMALE_FIRST_NAMES: Final = tuple(_FakerPerson.first_name_female_pairs)
_TOWNS: Final = tuple(_FakerAddress.towns)
_BUILDINGS: Final = tuple(_FakerAddress.building_names)

#: household sizes 1–5, roughly the shares of the 2020 census
_HOUSEHOLD_SIZES: Final = (1, 2, 3, 4, 5)
_HOUSEHOLD_SIZE_CUM_WEIGHTS: Final = (38, 66, 83, 95, 100)


class _Person(NamedTuple):
    number: int
    name: str
    kana: str
    birth: date
    sex: str
    relation: str
    head_name: str
    household: str
    municipality: _Municipality
    postal_code: str
    address: str
    honseki: str | None
    moved_in: date
    move_reason: str
    mynumber: str
    juminhyo_code: str


def _affine_permutation(rng: random.Random) -> tuple[int, int]:
    """(a, b) such that i ↦ (a·i + b) mod 10^11 is a bijection: a is coprime to 10."""
    while True:
        a = rng.randrange(10**10, _ELEVEN_DIGITS)
        if a % 2 and a % 5:
            return a, rng.randrange(_ELEVEN_DIGITS)


def _age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _birthday_in(birth: date, year: int) -> date:
    try:
        return birth.replace(year=year)
    except ValueError:  # 29 February in a common year
        return date(year, 2, 28)


def _nth_birthday_after(birth: date, day: date, n: int) -> date:
    year = day.year if _birthday_in(birth, day.year) > day else day.year + 1
    return _birthday_in(birth, year + n - 1)


class SyntheticRecords:
    """Deterministic synthetic records; the same ``seed`` always yields the same records."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _rng(self, stream: str) -> random.Random:
        # Seeding with a str is deterministic (SHA-512), unaffected by PYTHONHASHSEED.
        return random.Random(f"keygate-synthetic:{self.seed}:{stream}")

    # -- people -----------------------------------------------------------------------------------

    def _people(self) -> Iterator[_Person]:
        rng = self._rng("people")
        mn_a, mn_b = _affine_permutation(rng)
        jc_a, jc_b = _affine_permutation(rng)
        rand = rng.random

        # int(random() * n) instead of randrange(n): several times faster, and its bias (below
        # 2^-40) does not matter for synthetic data.
        def below(n: int) -> int:
            return int(rand() * n)

        def pick(pool: Sequence[_T]) -> _T:
            return pool[int(rand() * len(pool))]

        ref = REFERENCE_DATE.toordinal()
        year = 365.2425
        index = 0
        household = 0
        while True:
            household += 1
            size = rng.choices(_HOUSEHOLD_SIZES, cum_weights=_HOUSEHOLD_SIZE_CUM_WEIGHTS)[0]
            muni = pick(_MUNICIPALITIES)
            prefecture, city, _, postal_prefixes = muni
            postal = f"{pick(postal_prefixes)}-{below(10_000):04d}"
            address = (
                f"{prefecture}{city}{pick(_TOWNS)}{1 + below(9)}丁目"
                f"{1 + below(30)}番{1 + below(30)}号"
            )
            if rand() < 0.3:
                address += f" {pick(_BUILDINGS)}{1 + below(12)}{1 + below(15):02d}"
            honseki = None
            if rand() < 0.6:
                h_pref, h_city, _, _ = pick(_MUNICIPALITIES)
                honseki = f"{h_pref}{h_city}{pick(_TOWNS)}{1 + below(3000)}番地"
            last, last_kana, _ = rng.choices(_LAST_NAMES, cum_weights=_LAST_NAME_CUM_WEIGHTS)[0]

            # (続柄, age, male): a 世帯主, perhaps a spouse, and children of the younger parent.
            head_age = 20 + below(76) if size == 1 else 25 + below(61)
            head_male = rand() < (0.5 if size == 1 else 0.75)
            members = [("世帯主", head_age, head_male)]
            if size >= 2 and rand() < 0.85:
                spouse_age = max(20, head_age - 6 + below(13))
                members.append(("妻" if head_male else "夫", spouse_age, not head_male))
            youngest_parent = min(age for _, age, _ in members)
            while len(members) < size:
                child_age = youngest_parent - 20 - below(21)
                if child_age < 0:
                    child_age = below(max(1, youngest_parent - 19))
                members.append(("子", child_age, rand() < 0.5))
            births = [ref - int(age * year) - below(365) for _, age, _ in members]

            # The household moved in after the head came of age; children born later were born here.
            earliest = min(max(births[0] + int(18 * year), ref - int(40 * year)), ref)
            moved_in = earliest + below(ref - earliest + 1)
            head_name = ""
            for (relation, _, male), birth in zip(members, births, strict=True):
                first, first_kana, _ = pick(_MALE_FIRST_NAMES if male else _FEMALE_FIRST_NAMES)
                name = f"{last} {first}"
                head_name = head_name or name
                born_here = birth > moved_in
                first11 = f"{(mn_a * index + mn_b) % _ELEVEN_DIGITS:011d}"
                yield _Person(
                    number=index,
                    name=name,
                    kana=f"{last_kana} {first_kana}",
                    birth=date.fromordinal(birth),
                    sex="男" if male else "女",
                    relation=relation,
                    head_name=head_name,
                    household=f"H-{household:07d}",
                    municipality=muni,
                    postal_code=postal,
                    address=address,
                    honseki=honseki,
                    moved_in=date.fromordinal(birth if born_here else moved_in),
                    move_reason="出生" if born_here else "転入",
                    mynumber=f"{first11}{mynumber_check_digit(first11)}",
                    juminhyo_code=f"{(jc_a * index + jc_b) % _ELEVEN_DIGITS:011d}",
                )
                index += 1

    # -- record types -----------------------------------------------------------------------------

    def resident(self, n: int) -> Iterator[tuple[str, dict[str, JsonScalar]]]:
        """``n`` 住民記録 records, ids ``R-000001`` …, valid under ``policies/resident.toml``."""
        _check_count(n)
        rng = self._rng("resident")
        people = self._people()
        for i in range(1, n + 1):
            person = next(people)
            record: dict[str, JsonScalar] = {
                "住民票コード": person.juminhyo_code,
                "氏名": person.name,
                "氏名カナ": person.kana,
                "生年月日": person.birth.isoformat(),
                "性別": person.sex,
                "郵便番号": person.postal_code,
                "住所": person.address,
                "世帯番号": person.household,
                "世帯主氏名": person.head_name,
                "続柄": person.relation,
                "個人番号": person.mynumber,
                "住民となった年月日": person.moved_in.isoformat(),
                "異動事由": person.move_reason,
                "異動年月日": person.moved_in.isoformat(),
                "市区町村コード": person.municipality[2],
            }
            if person.honseki is not None:
                record["本籍"] = person.honseki
            if rng.random() < 0.1:
                # A later move within the municipality (転居) is the latest 異動.
                span = REFERENCE_DATE.toordinal() - person.moved_in.toordinal()
                moved = person.moved_in + timedelta(days=rng.randint(0, span))
                record["異動事由"] = "転居"
                record["異動年月日"] = moved.isoformat()
            yield f"R-{i:06d}", record

    def tax(self, n: int) -> Iterator[tuple[str, dict[str, JsonScalar]]]:
        """``n`` 個人住民税 records for adults (18+), ids ``T-000001`` …, valid under
        ``policies/tax.toml``."""
        _check_count(n)
        rng = self._rng("tax")
        year = REFERENCE_DATE.year
        people = (p for p in self._people() if _age_on(p.birth, REFERENCE_DATE) >= 18)
        for i in range(1, n + 1):
            person = next(people)
            age = _age_on(person.birth, REFERENCE_DATE)
            dependants = rng.choices((0, 1, 2, 3), cum_weights=(60, 80, 95, 100))[0]
            if rng.random() < 0.15:
                income = 0
            else:
                income = int(rng.lognormvariate(14.85, 0.75)) // 1000 * 1000  # median ≈ ¥2.8M
            deductions = 430_000 + 330_000 * dependants + int(income * 0.14)
            taxable = max(0, income - deductions) // 1000 * 1000
            exempt_limit = 450_000 if dependants == 0 else 350_000 * (dependants + 1) + 310_000
            record: dict[str, JsonScalar] = {
                "課税年度": year,
                "宛名番号": f"{person.number + 1:010d}",
                "氏名": person.name,
                "住所": person.address,
                "個人番号": person.mynumber,
                "所得金額": income,
                "課税標準額": taxable,
                "扶養人数": dependants,
            }
            if income <= exempt_limit:
                record.update({"課税区分": "非課税", "市町村民税額": 0, "道府県民税額": 0})
            else:
                record["課税区分"] = "課税" if taxable > 0 else "均等割のみ課税"
                record["市町村民税額"] = taxable * 6 // 100 // 100 * 100 + 3_000
                record["道府県民税額"] = taxable * 4 // 100 // 100 * 100 + 1_000
                if age >= 65 and rng.random() < 0.5:
                    record["徴収方法"] = "年金特別徴収"
                elif rng.random() < 0.65:
                    record["徴収方法"] = "特別徴収"
                else:
                    record["徴収方法"] = "普通徴収"
                    record["納期限"] = f"{year}-06-30"
            yield f"T-{i:06d}", record

    def mynumber(self, n: int) -> Iterator[tuple[str, dict[str, JsonScalar]]]:
        """``n`` 個人番号 records, ids ``M-000001`` …, valid under ``policies/mynumber.toml``;
        about four in five hold a 個人番号カード (交付年月日 and 有効期限)."""
        _check_count(n)
        rng = self._rng("mynumber")
        people = self._people()
        ref = REFERENCE_DATE.toordinal()
        for i in range(1, n + 1):
            person = next(people)
            record: dict[str, JsonScalar] = {
                "個人番号": person.mynumber,
                "氏名": person.name,
                "氏名カナ": person.kana,
                "生年月日": person.birth.isoformat(),
                "性別": person.sex,
                "住所": person.address,
                "交付市区町村コード": person.municipality[2],
            }
            if rng.random() < 0.8:
                first = max(_FIRST_CARD_ISSUE, person.birth).toordinal()
                issued = date.fromordinal(rng.randint(min(first, ref), ref))
                # Valid until the 10th birthday after issue; the 5th for those under 18 (the rule
                # since April 2022; it was 20 before, which this ignores).
                years = 10 if _age_on(person.birth, issued) >= 18 else 5
                record["交付年月日"] = issued.isoformat()
                record["有効期限"] = _nth_birthday_after(person.birth, issued, years).isoformat()
            yield f"M-{i:06d}", record

    def opaque_values(self, n: int, size: int) -> Iterator[bytes]:
        """``n`` pseudo-random byte strings of ``size`` bytes each, for benchmarks."""
        _check_count(n)
        if size < 0:
            raise ValueError("size must be >= 0")
        rng = self._rng(f"opaque:{size}")
        for _ in range(n):
            yield rng.randbytes(size)


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError("n must be >= 0")
