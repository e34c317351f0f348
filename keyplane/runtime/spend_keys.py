"""The Redis key names of the spend windows and reservations: one key family, one hash slot.

A request reserves and settles over the windows of a key *and its ancestors* in one script. Redis Cluster
runs a script only when every key it touches lives in one hash slot, so every name below carries the
family's root key id as a hash tag (``{key_root}``): a root key, all its sub-keys at any depth, their
windows, their reservation records and the family's reservation queue hash to the same slot, and different
families spread over the cluster.

    {ns}:sp:{root}:{bucket}:m:{minute}    settled tokens this minute (expires after 120 s)
    {ns}:sp:{root}:{bucket}:d:{yyyy-mm-dd} settled USD today  (seeded from the store on first use)
    {ns}:sp:{root}:{bucket}:M:{yyyy-mm}    settled USD this month (seeded likewise)
    {ns}:sp:{root}:{bucket}:rt / :ru      tokens / USD held by reservations not yet settled
    {ns}:sp:{root}:rsq                    the family's reservations: sorted set, id -> deadline
    {ns}:sp:{root}:rs:{id}                one reservation: [tokens, USD, [bucket bases]]
    {ns}:sp:{root}:rs:{id}:done           set once it is settled: a settle retried after a lost answer counts once

The scripts (shared.RESERVE_SCRIPT, SETTLE_SCRIPT) build the record and ``:rt``/``:ru`` names of a
reservation they reap from ``ARGV[1]`` (:meth:`SpendKeys.script_prefix`) and the bucket bases a record
stores: those are names of the same family, so of the same slot. A namespace must not contain ``{}``
(Redis then hashes the whole name); any other brace in it still keeps a family in one slot.
"""

from __future__ import annotations

from keyplane.runtime.spend import windows


class SpendKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # "keyplane:": the deployment's namespace and a colon

    def script_prefix(self, family: str) -> str:
        return f"{self.prefix}sp:{{{family}}}:"

    def base(self, family: str, bucket: str) -> str:
        return f"{self.script_prefix(family)}{bucket}"

    def windows(self, family: str, bucket: str, now: float) -> tuple[str, str, str]:
        """This minute's tokens, today's USD, this month's USD."""
        minute, day, month = windows(now)
        base = self.base(family, bucket)
        return f"{base}:m:{minute}", f"{base}:d:{day}", f"{base}:M:{month}"

    def reserved(self, family: str, bucket: str) -> tuple[str, str]:
        """Tokens and USD held by reservations."""
        base = self.base(family, bucket)
        return f"{base}:rt", f"{base}:ru"

    def queue(self, family: str) -> str:
        return f"{self.script_prefix(family)}rsq"

    def record(self, family: str, grant_id: str) -> str:
        return f"{self.script_prefix(family)}rs:{grant_id}"

    def settled(self, family: str, grant_id: str) -> str:
        return f"{self.script_prefix(family)}rs:{grant_id}:done"
