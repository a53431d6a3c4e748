//! Pipeline state: inboxes, ack cursors, groups, block lists and the dedup table.
//!
//! [`State`] is what the engine reads and changes; [`MemState`] keeps it in memory
//! and is rebuilt from the log at start. Every method is synchronous: a remote store
//! (Redis) would need the engine to split its decisions around the round trips,
//! which is a later issue.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use crate::api::{Entry, Message};
use crate::dedup::{Accepted, DedupKey, DedupStats, DedupTable};
use crate::intern::{DeviceId, Interner};
use crate::sharded::ShardedMap;
use crate::FastMap;

/// A page of inbox entries.
#[derive(Debug, Default)]
pub struct Page {
    /// Entries with `seq > after`, ascending.
    pub entries: Vec<Entry>,
    /// More retained entries follow the page.
    pub more: bool,
}

/// The state the engine decides on. Changes come only from applying log records
/// (and ack cursors, which are applied when logged), in log order.
pub trait State {
    /// Highest `seq` ever given in `user`'s inbox; 0 for none.
    fn head(&self, user: &str) -> u64;
    /// Lowest retained `seq` of `user`'s inbox, `head + 1` when none is retained.
    fn first_seq(&self, user: &str) -> u64;
    /// The node's one copy of `user`'s id, creating the user's (empty) inbox if it has
    /// none. The engine's sessions keep this copy instead of their own, its presence map
    /// the copy's [`UserId`], and every message the user sends the copy, so an online
    /// user's id is stored once (DESIGN.md §6).
    fn user(&mut self, user: &str) -> Arc<str>;
    /// The node's copy of `user`'s id if the user has an inbox.
    fn known_user(&self, user: &str) -> Option<Arc<str>>;
    /// Appends `msg` to `user`'s inbox with the next `seq`, keeping at most the
    /// configured number of entries, and returns that `seq`. Entries accepted before `min_ts`
    /// are dropped every [`EXPIRE_EVERY_APPENDS`] appends of an inbox (so the hot path
    /// seldom reads an old message): whoever reads an inbox calls
    /// [`expire`](State::expire) first.
    fn append(&mut self, user: &str, msg: &Arc<Message>, min_ts: u64) -> u64 {
        self.append_to(user, msg, min_ts).0
    }
    /// [`append`](State::append), also returning the [`UserId`] of the user's copy of
    /// its id, found by the same lookup.
    fn append_to(&mut self, user: &str, msg: &Arc<Message>, min_ts: u64) -> (u64, UserId);
    /// Drops `user`'s entries accepted before `min_ts` (ms since the Unix epoch).
    fn expire(&mut self, user: &str, min_ts: u64);
    /// At most `limit` retained entries with `seq > after`.
    fn page(&self, user: &str, after: u64, limit: usize) -> Page;
    /// A device's ack cursor, `None` for a device never seen.
    fn cursor(&self, user: &str, device: &str) -> Option<u64>;
    /// Moves a device's ack cursor to `seq`, never backwards.
    fn set_cursor(&mut self, user: &str, device: &str, seq: u64);
    /// A group's members, `None` for an unknown group.
    fn group(&self, group: &str) -> Option<&BTreeSet<String>>;
    /// [`append_to`](State::append_to) for every member of `group`, in the order of
    /// their ids, calling `each` with the member's new `seq` and [`UserId`]. Nothing
    /// for an unknown group.
    fn append_to_group(
        &mut self,
        group: &str,
        msg: &Arc<Message>,
        min_ts: u64,
        each: impl FnMut(u64, UserId),
    );
    /// Replaces (creates) a group.
    fn put_group(&mut self, group: &str, members: BTreeSet<String>);
    /// Whether `user` refuses messages from `from`.
    fn blocks(&self, user: &str, from: &str) -> bool;
    /// Replaces `user`'s block list.
    fn put_blocked(&mut self, user: &str, users: HashSet<String>);
    /// The dedup key of (`user`, client `id`).
    fn dedup_key(&self, user: &str, id: &str) -> DedupKey;
    /// What `key` was accepted as, if at or after `min_ts`.
    fn dedup(&self, key: DedupKey, min_ts: u64) -> Option<Accepted>;
    /// Remembers `key` → `accepted`. Returns whether the table was full and forgot an
    /// entry inside the window to make room.
    fn put_dedup(&mut self, key: DedupKey, accepted: Accepted) -> bool;
    /// Forgets `key` if its entry is from batch `batch` (which failed).
    fn forget_dedup(&mut self, key: DedupKey, batch: u64);
    /// Forgets dedup entries accepted before `min_ts`.
    fn expire_dedup(&mut self, min_ts: u64);
    /// The dedup table's size and what it forgot early.
    fn dedup_stats(&self) -> DedupStats;
    /// Users with an inbox.
    fn users(&self) -> u64;
    /// Retained inbox entries, all users together.
    fn inbox_entries(&self) -> u64;
}

/// The identity of a user as the state holds it: the address of the node's one copy
/// of the user's id ([`State::user`]). A state keeps a user's copy for as long as it
/// keeps the user, and the engine's sessions hold the copy too, so while a session
/// lives its user's id cannot move and no other user's can take its place.
///
/// The engine keys its presence map by it: finding a member's open sessions then
/// hashes and compares one word, where hashing and comparing the id's bytes read a
/// cold cache line per member of a group message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UserId(usize);

impl UserId {
    /// The identity of `user`, a copy the state gave out.
    pub fn of(user: &Arc<str>) -> UserId {
        UserId(Arc::as_ptr(user).cast::<u8>() as usize)
    }
}

/// How often an append also applies the age retention to its inbox.
pub const EXPIRE_EVERY_APPENDS: u64 = 64;

/// Entries an inbox lets fall out of its retention before it frees them, all at once.
/// Freeing the oldest entry on every append read a cold cache line per append (a group
/// message appends to every member's inbox); freeing 64 reads 8 adjacent lines.
const FREE_EVERY_ENTRIES: usize = 64;

/// One user's inbox. Sized for the many users that are online and idle: the block
/// list is boxed (most users have none) and one device's ack cursor lives inline.
#[derive(Default)]
struct Inbox {
    head: u64,
    /// The messages, oldest first: the retained ones (the last `keep`) and before them
    /// up to [`FREE_EVERY_ENTRIES`] that fell out of retention and are not freed yet.
    /// Seqs are contiguous, so entry `i` is at `head + 1 - len + i` and none is stored.
    entries: VecDeque<Stored>,
    cursors: Cursors,
    // Boxed: 8 bytes in every inbox instead of 48, and most users block nobody.
    #[allow(clippy::box_collection)]
    blocked: Option<Box<HashSet<String>>>,
}

/// A user's ack cursors by device. Almost every user has one device, or a few.
#[derive(Default)]
enum Cursors {
    #[default]
    None,
    One(DeviceId, u64),
    // Boxed: a `Vec` inline would make every inbox's cursors 32 bytes, not 16.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<(DeviceId, u64)>>),
}

impl Cursors {
    fn get(&self, device: DeviceId) -> Option<u64> {
        match self {
            Cursors::None => None,
            Cursors::One(d, seq) => (*d == device).then_some(*seq),
            Cursors::Many(all) => all.iter().find(|(d, _)| *d == device).map(|&(_, s)| s),
        }
    }

    /// Moves `device`'s cursor to `seq`, never backwards.
    fn advance(&mut self, device: DeviceId, seq: u64) {
        match self {
            Cursors::None => *self = Cursors::One(device, seq),
            Cursors::One(d, s) if *d == device => *s = (*s).max(seq),
            Cursors::One(d, s) => *self = Cursors::Many(Box::new(vec![(*d, *s), (device, seq)])),
            Cursors::Many(all) => match all.iter_mut().find(|(d, _)| *d == device) {
                Some((_, s)) => *s = (*s).max(seq),
                None => all.push((device, seq)),
            },
        }
    }
}

/// A message as inboxes hold it: every inbox it is in shares one `Rc` of the
/// message's `Arc`. The pipeline thread adds and drops inbox entries by the million (a
/// group message is an entry per member), and a count that only this thread touches
/// needs no atomic operation; the `Arc` is what crosses to the shards.
type Stored = Rc<Arc<Message>>;

/// The in-memory [`State`].
pub struct MemState {
    /// Entries an inbox retains.
    keep: usize,
    /// Keyed by the node's one copy of each user id (see [`State::user`]).
    inboxes: ShardedMap<Arc<str>, Inbox>,
    /// Device ids of ack cursors.
    devices: Interner,
    groups: FastMap<String, Group>,
    dedup: DedupTable,
    entries: u64,
    /// The message appended last, so the appends of one message (to a group's members,
    /// or to the sender's and the recipient's inboxes) share one [`Stored`].
    last: Option<Stored>,
}

/// A group: its members' ids, and where each member's inbox is filed.
struct Group {
    members: BTreeSet<String>,
    /// One per member, in the order of `members`.
    inboxes: Vec<MemberInbox>,
}

/// Where a group member's inbox is filed: the hash of the member's id, and the node's
/// copy of the id if the member had an inbox when the group was put (else a copy of
/// its own, which becomes the inbox's key when the first message makes the inbox).
/// A group message finds each member's inbox by the hash and the copy's address, so it
/// neither hashes nor compares the member's id (cold lines, a thousand of them for a
/// group of a thousand).
struct MemberInbox {
    hash: u64,
    key: Arc<str>,
}

impl Inbox {
    /// How many entries are retained: the last `keep` at most.
    fn retained(&self, keep: usize) -> usize {
        self.entries.len().min(keep)
    }

    /// The seq of the oldest retained entry, `head + 1` when none is retained.
    fn first_seq(&self, keep: usize) -> u64 {
        self.head + 1 - self.retained(keep) as u64
    }

    /// Drops entries accepted before `min_ts`; returns how many of them were retained.
    fn expire(&mut self, min_ts: u64, keep: usize) -> u64 {
        let before = self.retained(keep);
        while self.entries.front().is_some_and(|m| m.ts < min_ts) {
            self.entries.pop_front();
        }
        (before - self.retained(keep)) as u64
    }

    /// See [`State::append`]. Returns the new `seq` and how many entries left retention.
    fn push(&mut self, msg: Stored, keep: usize, min_ts: u64) -> (u64, u64) {
        let mut dropped = 0;
        if (self.head + 1) % EXPIRE_EVERY_APPENDS == 0 {
            dropped += self.expire(min_ts, keep);
        }
        self.head += 1;
        let before = self.retained(keep);
        self.entries.push_back(msg);
        dropped += (before + 1 - self.retained(keep)) as u64;
        if self.entries.len() >= keep.saturating_add(FREE_EVERY_ENTRIES) {
            self.entries.drain(..self.entries.len() - keep);
        }
        (self.head, dropped)
    }
}

impl MemState {
    /// Empty state whose inboxes retain the last `keep` entries.
    pub fn new(keep: usize) -> Self {
        assert!(keep > 0, "an inbox keeps at least one entry");
        MemState {
            keep,
            inboxes: ShardedMap::default(),
            devices: Interner::default(),
            groups: FastMap::default(),
            dedup: DedupTable::default(),
            entries: 0,
            last: None,
        }
    }

    /// The same state with a dedup table of at most `max` entries (at least
    /// [`MAX_ENTRIES_MIN`](crate::dedup::MAX_ENTRIES_MIN)).
    pub fn with_dedup_max_entries(mut self, max: usize) -> Self {
        self.dedup = DedupTable::new(max);
        self
    }

    /// The [`Stored`] handle of `msg`, shared with the appends of the same message
    /// before it.
    fn stored(&mut self, msg: &Arc<Message>) -> Stored {
        match &self.last {
            Some(last) if Arc::ptr_eq(last, msg) => last.clone(),
            _ => self.last.insert(Rc::new(msg.clone())).clone(),
        }
    }

    fn inbox_mut(&mut self, user: &str) -> &mut Inbox {
        if !self.inboxes.contains_key(user) {
            self.inboxes.insert(Arc::from(user), Inbox::default());
        }
        self.inboxes.get_mut(user).expect("inserted above")
    }
}

/// Pushes `msg` to `user`'s inbox, made under `new_key()` if the user has none: the
/// entry's `seq`, how many entries the push dropped, and the identity of the inbox's
/// key. One lookup for a known user.
fn push_to(
    inboxes: &mut ShardedMap<Arc<str>, Inbox>,
    user: &str,
    new_key: impl FnOnce() -> Arc<str>,
    msg: Stored,
    keep: usize,
    min_ts: u64,
) -> (u64, u64, UserId) {
    if let Some((key, inbox)) = inboxes.get_key_value_mut(user) {
        let (seq, dropped) = inbox.push(msg, keep, min_ts);
        return (seq, dropped, UserId::of(key));
    }
    let mut inbox = Inbox::default();
    let (seq, dropped) = inbox.push(msg, keep, min_ts);
    let key = new_key();
    let id = UserId::of(&key);
    inboxes.insert(key, inbox);
    (seq, dropped, id)
}

impl State for MemState {
    fn user(&mut self, user: &str) -> Arc<str> {
        if let Some((key, _)) = self.inboxes.get_key_value(user) {
            return key.clone();
        }
        let key: Arc<str> = Arc::from(user);
        self.inboxes.insert(key.clone(), Inbox::default());
        key
    }

    fn known_user(&self, user: &str) -> Option<Arc<str>> {
        self.inboxes.get_key_value(user).map(|(key, _)| key.clone())
    }

    fn head(&self, user: &str) -> u64 {
        self.inboxes.get(user).map_or(0, |i| i.head)
    }

    fn first_seq(&self, user: &str) -> u64 {
        self.inboxes.get(user).map_or(1, |i| i.first_seq(self.keep))
    }

    fn append_to(&mut self, user: &str, msg: &Arc<Message>, min_ts: u64) -> (u64, UserId) {
        let msg = self.stored(msg);
        let (seq, dropped, id) = push_to(
            &mut self.inboxes,
            user,
            || Arc::from(user),
            msg,
            self.keep,
            min_ts,
        );
        self.entries = self.entries + 1 - dropped;
        (seq, id)
    }

    fn expire(&mut self, user: &str, min_ts: u64) {
        if let Some(inbox) = self.inboxes.get_mut(user) {
            self.entries -= inbox.expire(min_ts, self.keep);
        }
    }

    fn page(&self, user: &str, after: u64, limit: usize) -> Page {
        let Some(inbox) = self.inboxes.get(user) else {
            return Page::default();
        };
        // Seqs are contiguous: index arithmetic, no search.
        let retained = inbox.retained(self.keep);
        let first = inbox.first_seq(self.keep);
        let skip = after
            .saturating_add(1)
            .saturating_sub(first)
            .min(retained as u64) as usize;
        let live = inbox.entries.range(inbox.entries.len() - retained..);
        let entries: Vec<Entry> = (first + skip as u64..)
            .zip(live.skip(skip).take(limit))
            .map(|(seq, msg)| Entry {
                seq,
                msg: Arc::clone(msg),
            })
            .collect();
        let more = skip + entries.len() < retained;
        Page { entries, more }
    }

    fn cursor(&self, user: &str, device: &str) -> Option<u64> {
        let device = self.devices.get(device)?;
        self.inboxes.get(user)?.cursors.get(device)
    }

    fn set_cursor(&mut self, user: &str, device: &str, seq: u64) {
        let device = self.devices.intern(device);
        self.inbox_mut(user).cursors.advance(device, seq);
    }

    fn group(&self, group: &str) -> Option<&BTreeSet<String>> {
        self.groups.get(group).map(|g| &g.members)
    }

    fn append_to_group(
        &mut self,
        group: &str,
        msg: &Arc<Message>,
        min_ts: u64,
        mut each: impl FnMut(u64, UserId),
    ) {
        let keep = self.keep;
        let msg = self.stored(msg);
        let Some(group) = self.groups.get_mut(group) else {
            return;
        };
        for member in &mut group.inboxes {
            let found = self
                .inboxes
                .find_hashed_mut(member.hash, |key| Arc::ptr_eq(key, &member.key));
            let (seq, dropped, id) = match found {
                Some((key, inbox)) => {
                    let (seq, dropped) = inbox.push(msg.clone(), keep, min_ts);
                    (seq, dropped, UserId::of(key))
                }
                // The member had no inbox when the group was put, and has one now
                // (under another copy of the id) or gets it here under the group's:
                // either way the handle then names the inbox's key.
                None => {
                    let user = &*member.key;
                    let pushed = push_to(
                        &mut self.inboxes,
                        user,
                        || member.key.clone(),
                        msg.clone(),
                        keep,
                        min_ts,
                    );
                    if pushed.2 != UserId::of(&member.key) {
                        let (key, _) = self.inboxes.get_key_value(user).expect("pushed to");
                        member.key = key.clone();
                    }
                    pushed
                }
            };
            self.entries = self.entries + 1 - dropped;
            each(seq, id);
        }
    }

    fn put_group(&mut self, group: &str, members: BTreeSet<String>) {
        let inboxes = members
            .iter()
            .map(|id| MemberInbox {
                hash: self.inboxes.hash_of(id.as_str()),
                key: self
                    .inboxes
                    .get_key_value(id.as_str())
                    .map_or_else(|| Arc::from(id.as_str()), |(key, _)| key.clone()),
            })
            .collect();
        self.groups
            .insert(group.to_owned(), Group { members, inboxes });
    }

    fn blocks(&self, user: &str, from: &str) -> bool {
        self.inboxes
            .get(user)
            .and_then(|i| i.blocked.as_ref())
            .is_some_and(|b| b.contains(from))
    }

    fn put_blocked(&mut self, user: &str, users: HashSet<String>) {
        self.inbox_mut(user).blocked = (!users.is_empty()).then(|| Box::new(users));
    }

    fn dedup_key(&self, user: &str, id: &str) -> DedupKey {
        self.dedup.key(user, id)
    }

    fn dedup(&self, key: DedupKey, min_ts: u64) -> Option<Accepted> {
        self.dedup.get(key, min_ts)
    }

    fn put_dedup(&mut self, key: DedupKey, accepted: Accepted) -> bool {
        self.dedup.put(key, accepted)
    }

    fn forget_dedup(&mut self, key: DedupKey, batch: u64) {
        self.dedup.forget(key, batch);
    }

    fn expire_dedup(&mut self, min_ts: u64) {
        self.dedup.expire(min_ts);
    }

    fn dedup_stats(&self) -> DedupStats {
        self.dedup.stats()
    }

    fn users(&self) -> u64 {
        self.inboxes.len() as u64
    }

    fn inbox_entries(&self) -> u64 {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_codec::frame::Target;

    fn msg(ts: u64) -> Arc<Message> {
        Arc::new(Message {
            msg_id: ts,
            ts,
            from: "a".into(),
            from_device: "d".into(),
            to: Target::User("b".into()),
            body: String::new(),
        })
    }

    #[test]
    fn pages_count_retention_and_time_expiry() {
        let mut s = MemState::new(5);
        for ts in 1..=10 {
            s.append("u", &msg(ts), 0);
        }
        assert_eq!(s.head("u"), 10);
        assert_eq!(s.first_seq("u"), 6);
        assert_eq!(s.inbox_entries(), 5);
        let p = s.page("u", 0, 2);
        assert_eq!(
            p.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![6, 7]
        );
        assert!(p.more);
        let p = s.page("u", 8, 100);
        assert_eq!(
            p.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![9, 10]
        );
        assert!(!p.more);
        assert!(s.page("u", 10, 100).entries.is_empty());
        assert!(s.page("u", 50, 100).entries.is_empty());
        s.expire("u", 9);
        assert_eq!(s.first_seq("u"), 9);
        assert_eq!(s.inbox_entries(), 2);
        s.expire("u", 100);
        assert_eq!(s.first_seq("u"), 11);
        assert_eq!(s.inbox_entries(), 0);
        assert_eq!(s.append("u", &msg(100), 0), 11, "seqs never restart");
    }

    #[test]
    fn the_appends_of_one_message_share_one_handle() {
        let mut s = MemState::new(5);
        let m = msg(1);
        for user in ["a", "b", "c"] {
            assert_eq!(s.append(user, &m, 0), 1);
        }
        assert_eq!(Arc::strong_count(&m), 2, "the test's and the inboxes' one");
        let other = msg(2);
        s.append("a", &other, 0);
        assert_eq!(Arc::strong_count(&m), 2, "still held by the inboxes");
        for user in ["a", "b", "c"] {
            s.expire(user, 100);
        }
        assert_eq!(Arc::strong_count(&m), 1, "expired everywhere");
        let p = s.page("a", 0, 10);
        assert!(p.entries.is_empty());
    }

    #[test]
    fn a_group_message_reaches_every_member_however_its_inbox_came_to_be() {
        let mut s = MemState::new(5);
        // "old" has an inbox before the group is put, "late" gets one after it (by a
        // direct message, under a copy of the id that is not the group's), "never" only
        // by the group's message.
        s.append("old", &msg(1), 0);
        let members: BTreeSet<String> = ["late", "never", "old"].map(String::from).into();
        s.put_group("g", members.clone());
        assert_eq!(s.group("g"), Some(&members));
        let late = s.user("late");
        s.append("late", &msg(2), 0);
        let mut got = Vec::new();
        let m = msg(3);
        s.append_to_group("g", &m, 0, |seq, id| got.push((seq, id)));
        let ids = ["late", "never", "old"].map(|u| UserId::of(&s.known_user(u).expect("inbox")));
        assert_eq!(got, vec![(2, ids[0]), (1, ids[1]), (2, ids[2])]);
        assert_eq!(ids[0], UserId::of(&late), "the inbox kept its key");
        assert_eq!(s.users(), 3);
        assert_eq!(s.inbox_entries(), 5);
        assert_eq!(Arc::strong_count(&m), 2, "one handle for the three entries");
        // Again, now that every member's handle names its inbox.
        got.clear();
        s.append_to_group("g", &msg(4), 0, |seq, id| got.push((seq, id)));
        assert_eq!(got, vec![(3, ids[0]), (2, ids[1]), (3, ids[2])]);
        for (user, head) in [("late", 3), ("never", 2), ("old", 3)] {
            assert_eq!(s.head(user), head, "{user}");
        }
        s.append_to_group("nobody", &msg(5), 0, |_, _| panic!("no such group"));
        assert_eq!(s.inbox_entries(), 8);
    }

    /// Entries out of retention are freed in batches, and never seen meanwhile.
    #[test]
    fn entries_out_of_retention_are_invisible_until_freed_together() {
        let keep = 5;
        let mut s = MemState::new(keep);
        let first = msg(1);
        s.append("u", &first, 0);
        for ts in 2..=(keep + FREE_EVERY_ENTRIES) as u64 - 1 {
            s.append("u", &msg(ts), 0);
            let head = s.head("u");
            assert_eq!(s.inbox_entries(), keep.min(head as usize) as u64);
            assert_eq!(s.first_seq("u"), head.saturating_sub(keep as u64) + 1);
            let page = s.page("u", 0, 100);
            let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (s.first_seq("u")..=head).collect::<Vec<_>>());
            assert!(page.entries.iter().all(|e| e.msg.ts == e.seq));
        }
        assert_eq!(
            Arc::strong_count(&first),
            2,
            "out of retention, not freed yet"
        );
        s.append("u", &msg(99), 0);
        assert_eq!(Arc::strong_count(&first), 1, "freed with the batch");
        assert_eq!(s.inboxes["u"].entries.len(), keep);
        assert_eq!(s.inbox_entries(), keep as u64);
        // Age expiry counts only retained entries.
        s.expire("u", 1000);
        assert_eq!(s.inbox_entries(), 0);
        assert_eq!(s.first_seq("u"), s.head("u") + 1);
    }

    #[test]
    fn appends_apply_the_age_retention_every_so_often() {
        let mut s = MemState::new(1000);
        for ts in 1..EXPIRE_EVERY_APPENDS {
            s.append("u", &msg(ts), 0);
        }
        assert_eq!(s.inbox_entries(), 63);
        // The 64th append applies `min_ts`: entries accepted before 50 go.
        assert_eq!(s.append("u", &msg(100), 50), 64);
        assert_eq!(s.first_seq("u"), 50);
        assert_eq!(s.inbox_entries(), 15);
        // Between those appends the age is not looked at; readers expire first.
        s.append("u", &msg(101), 1000);
        assert_eq!(s.inbox_entries(), 16);
        s.expire("u", 1000);
        assert_eq!(s.inbox_entries(), 0);
    }

    /// An append names the same user the node's copy of the id does, and no other.
    #[test]
    fn an_append_returns_the_users_identity() {
        let mut s = MemState::new(5);
        let (_, fresh) = s.append_to("a", &msg(1), 0);
        let a = s.user("a");
        assert_eq!(fresh, UserId::of(&a), "the copy the first append made");
        let b = s.user("b");
        let (seq, again) = s.append_to("a", &msg(2), 0);
        assert_eq!((seq, again), (2, UserId::of(&a)));
        assert_ne!(UserId::of(&a), UserId::of(&b));
        assert_eq!(s.append_to("b", &msg(3), 0).1, UserId::of(&b));
    }

    #[test]
    fn dedup_expires_but_keeps_reaccepted_keys() {
        let mut s = MemState::new(1000);
        let (x, y) = (s.dedup_key("a", "x"), s.dedup_key("a", "y"));
        let at = |msg_id, ts| Accepted {
            msg_id,
            ts,
            batch: 0,
        };
        s.put_dedup(x, at(1, 10));
        s.put_dedup(y, at(2, 20));
        assert_eq!(s.dedup(x, 5), Some(at(1, 10)));
        assert_eq!(s.dedup(x, 11), None, "outside the window");
        s.put_dedup(x, at(3, 30));
        s.expire_dedup(25);
        assert_eq!(s.dedup(x, 0), Some(at(3, 30)));
        assert_eq!(s.dedup(y, 0), None);
    }

    /// DESIGN.md §6: every online user has an inbox, idle or not. Today's sizes:
    /// raise a bound only with the README's memory measurement redone.
    #[test]
    fn an_inbox_is_small() {
        assert!(std::mem::size_of::<Inbox>() <= 64);
        assert!(std::mem::size_of::<Cursors>() <= 16);
    }

    #[test]
    fn cursors_of_several_devices() {
        let mut s = MemState::new(1000);
        s.set_cursor("u", "phone", 3);
        s.set_cursor("u", "web", 5);
        s.set_cursor("u", "tv", 1);
        s.set_cursor("u", "phone", 2);
        s.set_cursor("v", "phone", 9);
        assert_eq!(s.cursor("u", "phone"), Some(3));
        assert_eq!(s.cursor("u", "web"), Some(5));
        assert_eq!(s.cursor("u", "tv"), Some(1));
        assert_eq!(s.cursor("u", "watch"), None);
        assert_eq!(s.cursor("v", "phone"), Some(9));
        assert_eq!(s.cursor("v", "web"), None);
    }

    #[test]
    fn a_user_id_is_stored_once() {
        let mut s = MemState::new(1000);
        let a = s.user("alice");
        let b = s.user("alice");
        assert!(Arc::ptr_eq(&a, &b));
        s.set_cursor("alice", "phone", 1);
        assert!(Arc::ptr_eq(&a, &s.user("alice")));
        assert_eq!(s.users(), 1);
    }

    #[test]
    fn cursors_never_move_backwards() {
        let mut s = MemState::new(1000);
        assert_eq!(s.cursor("u", "d"), None);
        s.set_cursor("u", "d", 0);
        assert_eq!(s.cursor("u", "d"), Some(0));
        s.set_cursor("u", "d", 7);
        s.set_cursor("u", "d", 3);
        assert_eq!(s.cursor("u", "d"), Some(7));
    }
}
