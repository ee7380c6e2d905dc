//! Synthetic app and web events for demos, tests and benchmarks: a pure, deterministic
//! [`Generator`] (an iterator of [`Event`]s, fully determined by its [`GeneratorConfig`] and
//! seed) and a thin JSON-lines writer ([`write_jsonl`]) that can pace its output on the wall
//! clock ([`Pace`]: a rate, or event time at the clock's speed).
//!
//! # Model
//!
//! `users` users, each with a fixed platform (web, ios, android with weights 50/30/20), device
//! id and country. Every user alternates sessions and idle gaps:
//!
//! - A session has a geometric number of engagement events (mean `events_per_session`, at
//!   least 1) separated by exponential think times (mean `think_time`, capped at half of
//!   `session_gap_min`). Mobile sessions start with `app_open` and, with probability
//!   `app_close_probability` (when they have two events or more), end with `app_close`; web
//!   sessions start with a `page_view`. The other events are drawn from a weighted mix
//!   (`page_view`/`screen_view`, `click`/`tap`, `scroll`, `search`, `add_to_cart`,
//!   `purchase`).
//! - An idle gap is `session_gap_min` plus an exponential, with mean `idle` overall, so
//!   consecutive sessions are always at least `session_gap_min` apart. During a gap a push
//!   may be sent (probability `push_probability`): `push_sent`, then on mobile
//!   `notification_shown` a few seconds later. A mobile user's first session is preceded by
//!   `app_installed` (same millisecond as its `app_open`). These three are non-engagement
//!   events (configure them as excluded events).
//! - Each user's first session starts an exponential time (mean `idle`) after `start`, which
//!   is close to the steady state from the first minute on.
//!
//! Consequently the sessions are exactly recoverable by a sessionizer with an inactivity
//! timeout T such that `session_gap_min / 2 <= T < session_gap_min` (30 min with the
//! defaults), `app_open` as a start event and `app_close` as an end event. The ground truth is
//! available on each [`Event`] ([`Event::session`]) but never serialized.
//!
//! # Arrival order
//!
//! Events are generated in event-time order (a binary heap of users keyed by their next event
//! time) and emitted in *arrival* order: arrival = event time + uniform jitter in
//! `[0, disorder]`, plus `late_by` for a fraction `late_fraction` of the events; ties keep
//! generation order. An event is held back only until no event still to be generated could
//! arrive before it, so the buffer stays small. If event e' is emitted before e (and e is not
//! one of the delayed events), then e'.time <= arrival(e') <= arrival(e) <= e.time + disorder:
//! the disorder is bounded by `disorder`. With `count`, exactly the first `count` events in
//! event time are generated (so a smaller count gives a prefix of the same stream).
//!
//! # Reproducibility
//!
//! The randomness comes from two PCG-64 MCG generators (`rand_pcg::Pcg64Mcg`, a fixed,
//! documented algorithm with reference vectors) seeded from `seed` by SplitMix64: one for the
//! model, one for arrival jitter and lateness, so that `disorder` and `late_fraction` change
//! the order of the same events, not the events. Every distribution is implemented here from
//! raw 64-bit outputs, so the stream does not depend on the sampling code of any crate
//! version. The one outside ingredient is `f64::ln` from the platform's math library
//! (exponential and geometric draws): a platform whose `ln` rounds differently in the last bit
//! could in principle shift a time by one millisecond. A test pins the bytes of a stream.

use crate::codec::decode::{AUTO_MILLIS_FROM, MAX_TIME};
use crate::engine::Millis;
use compact_str::{format_compact, CompactString};
use rand_pcg::rand_core::Rng;
use rand_pcg::Pcg64Mcg;
use serde::ser::{Serialize, SerializeStruct, Serializer};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// A generator option that cannot be used, or a failure to write the events.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid generator option `{option}`: {problem}")]
    Invalid {
        option: &'static str,
        problem: String,
    },
    #[error("writing events: {0}")]
    Write(#[source] io::Error),
}

fn invalid(option: &'static str, problem: impl Into<String>) -> GenerateError {
    GenerateError::Invalid {
        option,
        problem: problem.into(),
    }
}

/// The user's platform, fixed per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    Web,
    Ios,
    Android,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Web => "web",
            Platform::Ios => "ios",
            Platform::Android => "android",
        }
    }

    pub fn is_mobile(self) -> bool {
        self != Platform::Web
    }
}

/// One synthetic event. Serializes (with serde) to the JSON object
/// `{"user_id","timestamp","event","platform","device_id", then "page" (web) or "screen"
/// (mobile) when the event has one, "country", and "campaign" for push events}`; the fields
/// after `campaign` in this struct are not serialized.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// `u-000123`: the user's index, zero-padded to at least 6 digits.
    pub user_id: CompactString,
    /// Event time, epoch milliseconds.
    pub timestamp: Millis,
    /// Event name.
    pub event: &'static str,
    pub platform: Platform,
    /// `d-` and 16 hex digits, fixed per user.
    pub device_id: CompactString,
    /// Web pages, e.g. `/product/1234`.
    pub page: Option<CompactString>,
    /// Mobile screens, e.g. `product`.
    pub screen: Option<&'static str>,
    /// ISO 3166 country code, fixed per user.
    pub country: &'static str,
    /// Push campaign of `push_sent` / `notification_shown`.
    pub campaign: Option<&'static str>,
    /// Not serialized: when the event is emitted (event time + jitter [+ `late_by`]).
    pub arrival: Millis,
    /// Not serialized: the event was delayed by `late_by`.
    pub delayed: bool,
    /// Not serialized, ground truth: the user's 1-based session number for engagement events,
    /// `None` for non-engagement events (`push_sent`, `notification_shown`, `app_installed`).
    pub session: Option<u32>,
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = 6
            + usize::from(self.page.is_some())
            + usize::from(self.screen.is_some())
            + usize::from(self.campaign.is_some());
        let mut m = s.serialize_struct("Event", n)?;
        m.serialize_field("user_id", self.user_id.as_str())?;
        m.serialize_field("timestamp", &self.timestamp)?;
        m.serialize_field("event", self.event)?;
        m.serialize_field("platform", self.platform.as_str())?;
        m.serialize_field("device_id", self.device_id.as_str())?;
        match &self.page {
            Some(p) => m.serialize_field("page", p.as_str())?,
            None => m.skip_field("page")?,
        }
        match self.screen {
            Some(sc) => m.serialize_field("screen", sc)?,
            None => m.skip_field("screen")?,
        }
        m.serialize_field("country", self.country)?;
        match self.campaign {
            Some(c) => m.serialize_field("campaign", c)?,
            None => m.skip_field("campaign")?,
        }
        m.end()
    }
}

/// Event names of the non-engagement events the generator emits.
pub const NON_ENGAGEMENT_EVENTS: [&str; 3] = ["push_sent", "notification_shown", "app_installed"];
/// The mobile start event.
pub const START_EVENT: &str = "app_open";
/// The mobile end event.
pub const END_EVENT: &str = "app_close";

/// The `sessionizer` flags that declare these event classes, as a run over generated events
/// needs them: start and end events, and the non-engagement events excluded.
pub fn event_class_flags() -> [String; 6] {
    [
        "--start-events".into(),
        START_EVENT.into(),
        "--end-events".into(),
        END_EVENT.into(),
        "--excluded-events".into(),
        NON_ENGAGEMENT_EVENTS.join(","),
    ]
}

/// What to generate. [`Default`] gives the command line's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorConfig {
    /// Number of users (at least 1).
    pub users: u32,
    /// Mean think time between two events of a session (exponential, capped at half of
    /// `session_gap_min`).
    pub think_time: Millis,
    /// Mean number of engagement events per session (geometric, at least 1).
    pub events_per_session: f64,
    /// Mean idle gap between two sessions of a user (at least `session_gap_min`).
    pub idle: Millis,
    /// Smallest idle gap: sessions of a user are always at least this far apart.
    pub session_gap_min: Millis,
    /// Event time of the beginning of the stream (epoch ms).
    pub start: Millis,
    /// Largest delay of an event's arrival after its event time (uniform jitter).
    pub disorder: Millis,
    /// Fraction of the events delayed by a further `late_by`.
    pub late_fraction: f64,
    /// Extra delay of the late events.
    pub late_by: Millis,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop at `start` + this much event time.
    pub duration: Option<Millis>,
    pub seed: u64,
    /// Probability that a push is sent during an idle gap.
    pub push_probability: f64,
    /// Probability that a mobile session of two events or more ends with `app_close`.
    pub app_close_probability: f64,
}

/// 2024-01-01T00:00:00Z.
pub const DEFAULT_START: Millis = 1_704_067_200_000;

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            users: 1000,
            think_time: 20_000,
            events_per_session: 12.0,
            idle: 2 * 3_600_000,
            session_gap_min: 31 * 60_000,
            start: DEFAULT_START,
            disorder: 0,
            late_fraction: 0.0,
            late_by: 2 * 3_600_000,
            count: None,
            duration: None,
            seed: 42,
            push_probability: 0.3,
            app_close_probability: 0.9,
        }
    }
}

impl GeneratorConfig {
    /// Checks every option; the error names the command-line flag.
    pub fn validate(&self) -> Result<(), GenerateError> {
        fn probability(option: &'static str, p: f64) -> Result<(), GenerateError> {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(invalid(option, format!("{p} is not between 0 and 1")))
            }
        }
        if self.users == 0 {
            return Err(invalid("--users", "must be at least 1"));
        }
        if self.think_time <= 0 {
            return Err(invalid("--think-time", "must be greater than zero"));
        }
        if !(self.events_per_session >= 1.0 && self.events_per_session <= 1e6) {
            return Err(invalid(
                "--events-per-session",
                format!("{} is not between 1 and 1000000", self.events_per_session),
            ));
        }
        if self.session_gap_min <= 0 {
            return Err(invalid("--session-gap-min", "must be greater than zero"));
        }
        if self.idle < self.session_gap_min {
            return Err(invalid(
                "--idle",
                "the mean idle gap must be at least --session-gap-min",
            ));
        }
        if self.disorder < 0 {
            return Err(invalid("--disorder", "must not be negative"));
        }
        if self.late_by < 0 {
            return Err(invalid("--late-by", "must not be negative"));
        }
        if matches!(self.duration, Some(d) if d < 0) {
            return Err(invalid("--duration", "must not be negative"));
        }
        probability("--late-fraction", self.late_fraction)?;
        probability("push_probability", self.push_probability)?;
        probability("app_close_probability", self.app_close_probability)?;
        Ok(())
    }
}

/// Parses `--start`: RFC 3339 (any offset) or `now` (the wall clock).
pub fn parse_start(text: &str) -> Result<Millis, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(chrono::Utc::now().timestamp_millis());
    }
    let ms = chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|e| format!("`{text}` is neither `now` nor an RFC 3339 time ({e})"))?;
    // The events' times are written in epoch milliseconds, which the sessionizer's default
    // time format (`auto`) reads as such from 10^11 (1973-03-03T09:46:40Z) to its maximum.
    if !(AUTO_MILLIS_FROM..=MAX_TIME).contains(&ms) {
        return Err(format!(
            "`{text}` is outside 1973-03-03T09:46:40Z .. 9999-12-31: the sessionizer's default \
             time format reads earlier millisecond times as seconds, and no time after 9999"
        ));
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------------------
// Randomness: one PCG stream, distributions written out here.

const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(SPLITMIX_GAMMA);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Random(Pcg64Mcg);

impl Random {
    /// Stream `k` (0, 1, ...) of `seed`: the (2k+1)-th and (2k+2)-th SplitMix64 outputs of
    /// `seed` form the 128-bit PCG state.
    fn new(seed: u64, k: u32) -> Self {
        let mut s = seed;
        for _ in 0..2 * k {
            splitmix64(&mut s);
        }
        let hi = splitmix64(&mut s);
        let lo = splitmix64(&mut s);
        Random(Pcg64Mcg::new((u128::from(hi) << 64) | u128::from(lo)))
    }

    fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, n)` (multiply-shift; bias at most n / 2^64).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`, 53 bits.
    fn unit(&mut self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponential with the given mean, in whole milliseconds.
    fn exp_ms(&mut self, mean: f64) -> Millis {
        let x = -mean * (-self.unit()).ln_1p();
        if x >= 9.0e15 {
            9_000_000_000_000_000
        } else {
            x.round() as Millis
        }
    }

    /// Geometric on 1, 2, 3... with the given mean (>= 1).
    fn geometric(&mut self, mean: f64) -> u32 {
        let p = 1.0 / mean;
        if p >= 1.0 {
            return 1;
        }
        let k = ((-self.unit()).ln_1p() / (-p).ln_1p()).floor();
        if k >= 999_999.0 {
            1_000_000
        } else {
            1 + k as u32
        }
    }

    fn weighted<T: Copy>(&mut self, table: &[(T, u32)]) -> T {
        let total: u32 = table.iter().map(|(_, w)| w).sum();
        let mut r = self.below(u64::from(total)) as u32;
        for &(v, w) in table {
            if r < w {
                return v;
            }
            r -= w;
        }
        table[table.len() - 1].0
    }
}

// ---------------------------------------------------------------------------------------
// Vocabulary.

const PLATFORMS: [(Platform, u32); 3] = [
    (Platform::Web, 50),
    (Platform::Ios, 30),
    (Platform::Android, 20),
];

const COUNTRIES: [(&str, u32); 8] = [
    ("US", 35),
    ("IN", 12),
    ("GB", 10),
    ("DE", 10),
    ("BR", 10),
    ("FR", 8),
    ("JP", 8),
    ("CA", 7),
];

const CAMPAIGNS: [(&str, u32); 4] = [
    ("welcome_back", 40),
    ("price_drop", 30),
    ("cart_reminder", 20),
    ("new_arrivals", 10),
];

#[derive(Clone, Copy)]
enum Action {
    View,
    Click,
    Scroll,
    Search,
    AddToCart,
    Purchase,
}

const ACTIONS: [(Action, u32); 6] = [
    (Action::View, 40),
    (Action::Click, 28),
    (Action::Scroll, 12),
    (Action::Search, 10),
    (Action::AddToCart, 7),
    (Action::Purchase, 3),
];

const WEB_BROWSE: [(&str, u32); 5] = [
    ("/", 25),
    ("/category", 25),
    ("/product", 40),
    ("/cart", 5),
    ("/account", 5),
];

const CATEGORIES: [&str; 6] = ["shoes", "shirts", "bags", "books", "garden", "toys"];

const SCREENS: [(&str, u32); 6] = [
    ("home", 25),
    ("feed", 20),
    ("category", 15),
    ("product", 30),
    ("cart", 5),
    ("profile", 5),
];

const PRODUCTS: u64 = 5000;

// ---------------------------------------------------------------------------------------
// Users.

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// The next event opens a session (after `app_installed` for a new mobile user).
    Idle,
    /// Event `k` (0-based) of a session of `n` events.
    Session { k: u32, n: u32, close: bool },
    /// A push during an idle gap; the next session starts at `next_start`.
    Push { next_start: Millis },
    /// The notification of that push, on mobile.
    Notification {
        next_start: Millis,
        campaign: &'static str,
    },
}

struct User {
    user_id: CompactString,
    device_id: CompactString,
    platform: Platform,
    country: &'static str,
    next: Millis,
    phase: Phase,
    sessions: u32,
    installed: bool,
}

/// An event waiting for its arrival time; ordered by (arrival, generation number).
struct Held {
    seq: u64,
    event: Event,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.event.arrival, self.seq).cmp(&(o.event.arrival, o.seq))
    }
}

/// The event stream: an iterator of [`Event`]s in arrival order. Deterministic: the same
/// configuration (seed included) gives the same events.
pub struct Generator {
    cfg: GeneratorConfig,
    /// The model (users, sessions, events).
    rng: Random,
    /// Arrival jitter and lateness, kept apart so that they do not change the events.
    arrival_rng: Random,
    users: Vec<User>,
    /// Users by (next event time, index).
    due: BinaryHeap<Reverse<(Millis, u32)>>,
    held: BinaryHeap<Reverse<Held>>,
    generated: u64,
    end: Option<Millis>,
    think_cap: Millis,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig) -> Result<Generator, GenerateError> {
        cfg.validate()?;
        let mut rng = Random::new(cfg.seed, 0);
        let n = cfg.users as usize;
        let mut users = Vec::with_capacity(n);
        let mut due = BinaryHeap::with_capacity(n);
        for i in 0..cfg.users {
            let platform = rng.weighted(&PLATFORMS);
            let country = rng.weighted(&COUNTRIES);
            let device_id = format_compact!("d-{:016x}", rng.u64());
            let next = cfg.start.saturating_add(rng.exp_ms(cfg.idle as f64));
            users.push(User {
                user_id: format_compact!("u-{i:06}"),
                device_id,
                platform,
                country,
                next,
                phase: Phase::Idle,
                sessions: 0,
                installed: false,
            });
            due.push(Reverse((next, i)));
        }
        let end = cfg.duration.map(|d| cfg.start.saturating_add(d));
        let think_cap = cfg.session_gap_min / 2;
        Ok(Generator {
            arrival_rng: Random::new(cfg.seed, 1),
            cfg,
            rng,
            users,
            due,
            held: BinaryHeap::new(),
            generated: 0,
            end,
            think_cap,
        })
    }

    /// The event time before which no further event will be generated, or `None` when
    /// generation is over.
    fn frontier(&self) -> Option<Millis> {
        if self.cfg.count.is_some_and(|c| self.generated >= c) {
            return None;
        }
        let Reverse((t, _)) = *self.due.peek()?;
        match self.end {
            Some(end) if t >= end => None,
            _ => Some(t),
        }
    }

    /// Generates the next event in event-time order (of the user due first).
    fn generate(&mut self) -> Event {
        let mut top = self
            .due
            .peek_mut()
            .expect("the heap holds every user, and there is at least one");
        let Reverse((t, idx)) = *top;
        let cfg = &self.cfg;
        let rng = &mut self.rng;
        let user = &mut self.users[idx as usize];
        let mobile = user.platform.is_mobile();

        let mut page = None;
        let mut screen = None;
        let mut campaign = None;
        let mut session = None;
        let name: &'static str;

        match user.phase {
            Phase::Idle if mobile && !user.installed => {
                user.installed = true;
                name = "app_installed";
                // The session opens at the same millisecond.
            }
            Phase::Idle | Phase::Session { .. } => {
                let (k, n, close) = match user.phase {
                    Phase::Session { k, n, close } => (k, n, close),
                    _ => {
                        user.sessions += 1;
                        let n = rng.geometric(cfg.events_per_session);
                        let close = mobile && n >= 2 && rng.chance(cfg.app_close_probability);
                        (0, n, close)
                    }
                };
                session = Some(user.sessions);
                if k == 0 {
                    if mobile {
                        name = START_EVENT;
                        screen = Some("home");
                    } else {
                        name = "page_view";
                        page = Some(web_page(rng, Action::View));
                    }
                } else if close && k + 1 == n {
                    name = END_EVENT;
                    screen = Some(rng.weighted(&SCREENS));
                } else {
                    let action = rng.weighted(&ACTIONS);
                    if mobile {
                        name = mobile_name(action);
                        screen = Some(mobile_screen(rng, action));
                    } else {
                        name = web_name(action);
                        page = Some(web_page(rng, action));
                    }
                }
                if k + 1 < n {
                    user.phase = Phase::Session { k: k + 1, n, close };
                    user.next = t + rng.exp_ms(cfg.think_time as f64).min(self.think_cap);
                } else {
                    let gap =
                        cfg.session_gap_min + rng.exp_ms((cfg.idle - cfg.session_gap_min) as f64);
                    let next_start = t.saturating_add(gap);
                    if rng.chance(cfg.push_probability) {
                        user.phase = Phase::Push { next_start };
                        user.next = t + 1 + rng.below(gap as u64 - 1) as Millis;
                    } else {
                        user.phase = Phase::Idle;
                        user.next = next_start;
                    }
                }
            }
            Phase::Push { next_start } => {
                name = "push_sent";
                let c = rng.weighted(&CAMPAIGNS);
                campaign = Some(c);
                let shown = t + 1000 + rng.below(9000) as Millis;
                if mobile && shown < next_start {
                    user.phase = Phase::Notification {
                        next_start,
                        campaign: c,
                    };
                    user.next = shown;
                } else {
                    user.phase = Phase::Idle;
                    user.next = next_start;
                }
            }
            Phase::Notification {
                next_start,
                campaign: c,
            } => {
                name = "notification_shown";
                campaign = Some(c);
                user.phase = Phase::Idle;
                user.next = next_start;
            }
        }

        let mut arrival = t;
        let arng = &mut self.arrival_rng;
        if cfg.disorder > 0 {
            arrival += arng.below(cfg.disorder as u64 + 1) as Millis;
        }
        let delayed = cfg.late_fraction > 0.0 && arng.chance(cfg.late_fraction);
        if delayed {
            arrival = arrival.saturating_add(cfg.late_by);
        }
        let event = Event {
            user_id: user.user_id.clone(),
            timestamp: t,
            event: name,
            platform: user.platform,
            device_id: user.device_id.clone(),
            page,
            screen,
            country: user.country,
            campaign,
            arrival,
            delayed,
            session,
        };
        *top = Reverse((user.next, idx));
        drop(top);
        self.generated += 1;
        event
    }
}

fn web_name(a: Action) -> &'static str {
    match a {
        Action::View => "page_view",
        Action::Click => "click",
        Action::Scroll => "scroll",
        Action::Search => "search",
        Action::AddToCart => "add_to_cart",
        Action::Purchase => "purchase",
    }
}

fn mobile_name(a: Action) -> &'static str {
    match a {
        Action::View => "screen_view",
        Action::Click => "tap",
        Action::Scroll => "scroll",
        Action::Search => "search",
        Action::AddToCart => "add_to_cart",
        Action::Purchase => "purchase",
    }
}

fn web_page(rng: &mut Random, a: Action) -> CompactString {
    match a {
        Action::Search => CompactString::const_new("/search"),
        Action::AddToCart => format_compact!("/product/{}", 1 + rng.below(PRODUCTS)),
        Action::Purchase => CompactString::const_new("/checkout"),
        Action::View | Action::Click | Action::Scroll => match rng.weighted(&WEB_BROWSE) {
            "/product" => format_compact!("/product/{}", 1 + rng.below(PRODUCTS)),
            "/category" => {
                let c = CATEGORIES[rng.below(CATEGORIES.len() as u64) as usize];
                format_compact!("/category/{c}")
            }
            p => CompactString::const_new(p),
        },
    }
}

fn mobile_screen(rng: &mut Random, a: Action) -> &'static str {
    match a {
        Action::Search => "search",
        Action::AddToCart => "product",
        Action::Purchase => "checkout",
        Action::View | Action::Click | Action::Scroll => rng.weighted(&SCREENS),
    }
}

impl Iterator for Generator {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            let frontier = self.frontier();
            if let Some(Reverse(h)) = self.held.peek() {
                if frontier.is_none_or(|f| h.event.arrival <= f) {
                    return self.held.pop().map(|Reverse(h)| h.event);
                }
            }
            frontier?;
            let seq = self.generated;
            let event = self.generate();
            if self.held.is_empty() && self.frontier().is_none_or(|f| event.arrival <= f) {
                // Nothing held and nothing still to come can arrive before it.
                return Some(event);
            }
            self.held.push(Reverse(Held { seq, event }));
        }
    }
}

/// How the output is paced on the wall clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As fast as possible.
    Unpaced,
    /// This many events per second (an absolute schedule: after an oversleep the next events
    /// go out at once).
    Rate(f64),
    /// Each event once as much wall-clock time has passed since the start as its arrival
    /// time is past `from` (the generator's start): event time passes at the wall clock's
    /// speed, so with a start of `now` the events are live.
    RealTime { from: Millis },
}

impl Pace {
    /// How long after the start event number `written` (0-based), arriving at `arrival`, is
    /// due; `None` when unpaced.
    fn due(self, written: u64, arrival: Millis) -> Option<Duration> {
        match self {
            Pace::Unpaced => None,
            Pace::Rate(r) => Some(Duration::from_secs_f64(written as f64 / r)),
            Pace::RealTime { from } => Some(Duration::from_millis(
                u64::try_from(arrival.saturating_sub(from)).unwrap_or(0),
            )),
        }
    }
}

/// Writes `events` as JSON lines, paced by `pace`; paced output is flushed after each event.
/// Returns the number of events written.
pub fn write_jsonl<W: Write>(
    events: impl Iterator<Item = Event>,
    out: &mut W,
    pace: Pace,
) -> Result<u64, GenerateError> {
    let mut line = Vec::with_capacity(256);
    let written = for_each_paced(events, pace, |ev| {
        line.clear();
        serde_json::to_writer(&mut line, ev).map_err(|e| GenerateError::Write(e.into()))?;
        line.push(b'\n');
        out.write_all(&line).map_err(GenerateError::Write)?;
        if pace != Pace::Unpaced {
            // Paced output is read live: don't let it sit in a buffer.
            out.flush().map_err(GenerateError::Write)?;
        }
        Ok(())
    })?;
    out.flush().map_err(GenerateError::Write)?;
    Ok(written)
}

/// Calls `emit` for every event, each no earlier than `pace` says. Returns the number of
/// events emitted.
pub fn for_each_paced(
    events: impl Iterator<Item = Event>,
    pace: Pace,
    mut emit: impl FnMut(&Event) -> Result<(), GenerateError>,
) -> Result<u64, GenerateError> {
    if let Pace::Rate(r) = pace {
        if !(r > 0.0 && r.is_finite()) {
            return Err(invalid("--rate", format!("{r} is not a positive rate")));
        }
    }
    let started = Instant::now();
    let mut written = 0u64;
    for ev in events {
        if let Some(due) = pace.due(written, ev.arrival) {
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        emit(&ev)?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn start_times_the_sessionizer_cannot_read_are_refused() {
        assert_eq!(parse_start("1973-03-03T09:46:40Z"), Ok(AUTO_MILLIS_FROM));
        assert_eq!(parse_start("2024-01-01T00:00:00Z"), Ok(DEFAULT_START));
        for bad in [
            "1973-03-03T09:46:39.999Z",
            "1970-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "soon",
        ] {
            assert!(parse_start(bad).is_err(), "{bad}");
        }
    }

    fn cfg(count: u64) -> GeneratorConfig {
        GeneratorConfig {
            count: Some(count),
            ..GeneratorConfig::default()
        }
    }

    fn events(c: GeneratorConfig) -> Vec<Event> {
        Generator::new(c).unwrap().collect()
    }

    #[test]
    fn same_seed_same_events_other_seed_other_events() {
        let a = events(cfg(5000));
        assert_eq!(a, events(cfg(5000)));
        let b = events(GeneratorConfig {
            seed: 43,
            ..cfg(5000)
        });
        assert_ne!(a, b);
    }

    /// The stream must not change with a crate version or an innocent refactoring: pin the
    /// raw generator and the bytes of a default stream. Changing the model on purpose
    /// changes the second pin; say so in the change.
    #[test]
    fn the_stream_is_pinned() {
        let mut splitmix = 0u64;
        assert_eq!(splitmix64(&mut splitmix), 0xe220_a839_7b1d_cdaf);
        let mut r = Random::new(42, 0);
        let first: Vec<u64> = (0..3).map(|_| r.u64()).collect();
        assert_eq!(
            first,
            [
                9_488_631_487_095_002_522,
                256_833_948_629_588_205,
                10_517_606_510_214_314_269
            ],
            "raw PCG outputs"
        );
        let mut out = Vec::new();
        write_jsonl(Generator::new(cfg(1000)).unwrap(), &mut out, Pace::Unpaced).unwrap();
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(&out),
            221_669_537_257_074_991,
            "first 1000 events of seed 42"
        );
    }

    #[test]
    fn count_is_exact_and_a_smaller_count_is_a_prefix() {
        let big = events(cfg(3000));
        let small = events(cfg(1000));
        assert_eq!(big.len(), 3000);
        assert_eq!(small.len(), 1000);
        assert_eq!(&big[..1000], &small[..]);
    }

    #[test]
    fn in_order_without_disorder_and_disorder_is_bounded() {
        let sorted = events(cfg(20_000));
        assert!(sorted.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        assert!(sorted.iter().all(|e| e.arrival == e.timestamp));
        let d = 30_000;
        let shuffled = events(GeneratorConfig {
            disorder: d,
            ..cfg(20_000)
        });
        let mut max = GeneratorConfig::default().start;
        let mut out_of_order = 0;
        for e in &shuffled {
            assert!(max - e.timestamp <= d, "disorder beyond the bound");
            if e.timestamp < max {
                out_of_order += 1;
            }
            max = max.max(e.timestamp);
        }
        assert!(out_of_order > 100, "{out_of_order} events out of order");
        // Same events, other order.
        let key = |e: &Event| (e.timestamp, e.user_id.clone(), e.event);
        let mut a: Vec<_> = sorted.iter().map(key).collect();
        let mut b: Vec<_> = shuffled.iter().map(key).collect();
        a.sort();
        b.sort();
        assert!(a == b, "disorder changed the events, not just their order");
        // Arrival order.
        assert!(shuffled.windows(2).all(|w| w[0].arrival <= w[1].arrival));
    }

    #[test]
    fn late_fraction_delays_about_that_fraction() {
        let es = events(GeneratorConfig {
            late_fraction: 0.05,
            ..cfg(20_000)
        });
        let delayed = es.iter().filter(|e| e.delayed).count();
        assert!((700..1300).contains(&delayed), "{delayed} delayed");
        let mut max = GeneratorConfig::default().start;
        let mut late = 0;
        for e in &es {
            if max - e.timestamp > 0 {
                late += 1;
                // Only a delayed event can be behind: anything emitted before an
                // undelayed event has an event time at most its arrival = its time.
                assert!(e.delayed);
            }
            max = max.max(e.timestamp);
        }
        assert!(late > 500, "{late} late");
    }

    #[test]
    fn duration_bounds_event_time() {
        let c = GeneratorConfig {
            duration: Some(6 * 3_600_000),
            users: 300,
            ..GeneratorConfig::default()
        };
        let start = c.start;
        let es = events(c);
        assert!(!es.is_empty());
        assert!(es
            .iter()
            .all(|e| e.timestamp >= start && e.timestamp < start + 6 * 3_600_000));
    }

    /// The ground truth is what the model promises: within a session gaps <= half the
    /// minimum gap, between sessions > the minimum gap; mobile sessions open with app_open.
    #[test]
    fn sessions_follow_the_model() {
        let c = GeneratorConfig {
            users: 300,
            ..cfg(60_000)
        };
        let gap_min = c.session_gap_min;
        let es = events(c);
        let mut last: HashMap<&str, (Millis, u32, &'static str)> = HashMap::new();
        let mut sizes: HashMap<(&str, u32), u32> = HashMap::new();
        let mut installed: HashMap<&str, u32> = HashMap::new();
        let mut platforms: HashMap<&str, Platform> = HashMap::new();
        for e in &es {
            assert_eq!(
                *platforms.entry(e.user_id.as_str()).or_insert(e.platform),
                e.platform
            );
            assert_eq!(
                e.page.is_some(),
                e.session.is_some() && !e.platform.is_mobile()
            );
            assert_eq!(
                e.screen.is_some(),
                e.session.is_some() && e.platform.is_mobile()
            );
            if e.event == "app_installed" {
                assert!(e.platform.is_mobile());
                *installed.entry(e.user_id.as_str()).or_default() += 1;
                assert!(!last.contains_key(e.user_id.as_str()));
            }
            let Some(s) = e.session else {
                assert!(NON_ENGAGEMENT_EVENTS.contains(&e.event));
                continue;
            };
            assert!(!NON_ENGAGEMENT_EVENTS.contains(&e.event));
            *sizes.entry((e.user_id.as_str(), s)).or_default() += 1;
            if let Some(&(t, prev, prev_name)) = last.get(e.user_id.as_str()) {
                if s == prev {
                    assert!(e.timestamp - t <= gap_min / 2);
                    assert_ne!(prev_name, END_EVENT);
                } else {
                    assert_eq!(s, prev + 1);
                    assert!(e.timestamp - t >= gap_min);
                }
            }
            let opens = s != last.get(e.user_id.as_str()).map_or(0, |l| l.1);
            if e.platform.is_mobile() {
                assert_eq!(opens, e.event == START_EVENT);
            } else if opens {
                assert_eq!(e.event, "page_view");
            }
            last.insert(e.user_id.as_str(), (e.timestamp, s, e.event));
        }
        assert!(installed.values().all(|&n| n == 1));
        let mobile = platforms.values().filter(|p| p.is_mobile()).count();
        assert_eq!(installed.len(), mobile);
        let web = platforms.values().filter(|p| **p == Platform::Web).count() as f64;
        let share = web / platforms.len() as f64;
        assert!((0.4..0.6).contains(&share), "web share {share}");
        let mean = sizes.values().map(|&n| f64::from(n)).sum::<f64>() / sizes.len() as f64;
        assert!(
            (10.5..13.5).contains(&mean),
            "mean events per session {mean}"
        );
        let noise = es.iter().filter(|e| e.session.is_none()).count() as f64 / es.len() as f64;
        assert!(
            (0.01..0.08).contains(&noise),
            "non-engagement share {noise}"
        );
    }

    #[test]
    fn distributions_have_their_means() {
        let mut r = Random::new(1, 0);
        let n = 200_000;
        let exp = (0..n).map(|_| r.exp_ms(20_000.0) as f64).sum::<f64>() / n as f64;
        assert!((exp - 20_000.0).abs() < 300.0, "exp mean {exp}");
        let geo = (0..n).map(|_| f64::from(r.geometric(12.0))).sum::<f64>() / n as f64;
        assert!((geo - 12.0).abs() < 0.2, "geometric mean {geo}");
        assert_eq!(r.geometric(1.0), 1);
        let below = (0..n).map(|_| r.below(10)).max();
        assert_eq!(below, Some(9));
    }

    #[test]
    fn serializes_the_documented_fields() {
        let es = events(cfg(200));
        for e in &es {
            let v: serde_json::Value = serde_json::to_value(e).unwrap();
            let o = v.as_object().unwrap();
            assert!(o["user_id"].as_str().unwrap().starts_with("u-"));
            assert_eq!(o["timestamp"].as_i64(), Some(e.timestamp));
            assert_eq!(o["event"], e.event);
            assert_eq!(o["platform"], e.platform.as_str());
            assert!(o["device_id"].as_str().unwrap().starts_with("d-"));
            assert!(!o.contains_key("session") && !o.contains_key("arrival"));
        }
        let first = serde_json::to_string(&es[0]).unwrap();
        assert!(first.starts_with(r#"{"user_id":"u-"#), "{first}");
    }

    #[test]
    fn invalid_options_name_their_flag() {
        let bad = |c: GeneratorConfig| match Generator::new(c) {
            Err(GenerateError::Invalid { option, .. }) => option,
            _ => panic!("accepted"),
        };
        let d = GeneratorConfig::default;
        assert_eq!(bad(GeneratorConfig { users: 0, ..d() }), "--users");
        assert_eq!(
            bad(GeneratorConfig {
                idle: 60_000,
                ..d()
            }),
            "--idle"
        );
        assert_eq!(
            bad(GeneratorConfig {
                late_fraction: 1.5,
                ..d()
            }),
            "--late-fraction"
        );
        assert_eq!(
            bad(GeneratorConfig {
                events_per_session: 0.5,
                ..d()
            }),
            "--events-per-session"
        );
        assert!(parse_start("2024-01-01T00:00:00Z") == Ok(DEFAULT_START));
        assert!(parse_start("yesterday").is_err());
        assert!(parse_start("now").unwrap() > DEFAULT_START);
    }

    #[test]
    fn writer_writes_one_line_per_event() {
        let mut out = Vec::new();
        let n = write_jsonl(Generator::new(cfg(100)).unwrap(), &mut out, Pace::Unpaced).unwrap();
        assert_eq!(n, 100);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 100);
        let mut paced = Vec::new();
        let t = Instant::now();
        write_jsonl(
            Generator::new(cfg(21)).unwrap(),
            &mut paced,
            Pace::Rate(1000.0),
        )
        .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(paced, out[..paced.len()]);
    }

    #[test]
    fn real_time_events_are_due_at_their_arrival_on_the_wall_clock() {
        let pace = Pace::RealTime { from: 10_000 };
        assert_eq!(pace.due(7, 10_250), Some(Duration::from_millis(250)));
        assert_eq!(pace.due(0, 9_000), Some(Duration::ZERO));
        assert_eq!(Pace::Rate(4.0).due(2, 0), Some(Duration::from_millis(500)));
        assert_eq!(Pace::Unpaced.due(2, 99), None);
    }
}
