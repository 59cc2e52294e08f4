//! Knowledge-base search benchmark: builds a deterministic 100,000-article corpus in Chinese and
//! English, then measures rebuild throughput, in-process search latency over 2,000 mixed queries,
//! incremental upsert throughput, publish → searchable freshness and resident memory.
//!
//! Run with `cargo bench -p tandem-search --bench search`. `SEARCH_BENCH_ARTICLES` and
//! `SEARCH_BENCH_QUERIES` override the corpus and query counts; `SEARCH_BENCH_STRATEGY`
//! (`auto`, `intersect`, `post`) forces how filters are applied.
//!
//! Search latency is reported three ways because the machine is shared: each query once (plain
//! wall time, disturbed by whatever else runs), the fastest of three runs of each query (an
//! estimate of undisturbed latency), and the process CPU time per search.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tandem_search::{
    ArticleDoc, Audience, FilterStrategy, IndexConfig, SearchError, SearchIndex, SearchRequest,
    Visibility,
};

const SEED: u64 = 0x7A4D_E15E_A5C4_2026;
const MAIN_TENANT: &str = "bench";
const WARM_UP_QUERIES: usize = 200;
const FRESHNESS_TRIALS: usize = 50;
const INCREMENTAL_UPSERTS: usize = 5_000;
const SMALL_TENANT: &str = "t1";
const SMALL_TENANT_QUERIES: usize = 500;

/// SplitMix64: tiny, fast and identical on every platform, so the corpus never changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const ZH_PRODUCTS: &[&str] = &[
    "手机",
    "笔记本电脑",
    "平板电脑",
    "蓝牙耳机",
    "智能手表",
    "路由器",
    "充电器",
    "移动电源",
    "显示器",
    "键盘",
    "鼠标",
    "打印机",
    "相机",
    "电视",
    "空调",
    "冰箱",
    "洗衣机",
    "扫地机器人",
    "电动牙刷",
    "吹风机",
    "咖啡机",
    "净水器",
    "会员卡",
    "礼品卡",
    "优惠套餐",
    "宽带",
    "流量包",
    "话费",
    "机票",
    "火车票",
    "酒店",
    "租车",
    "保险",
    "信用卡",
    "储蓄卡",
    "理财产品",
    "外卖",
    "生鲜",
    "家具",
    "床垫",
    "童装",
    "运动鞋",
    "护肤品",
    "眼镜",
    "行李箱",
    "自行车",
    "电动车",
    "游戏机",
    "音箱",
    "投影仪",
    "门锁",
    "摄像头",
    "体重秤",
    "空气净化器",
    "电饭煲",
    "微波炉",
    "积分卡",
    "电子书",
    "云存储",
    "视频会员",
];

const ZH_ACTIONS: &[&str] = &[
    "退款",
    "退货",
    "换货",
    "维修",
    "激活",
    "绑定",
    "解绑",
    "取消",
    "升级",
    "续费",
    "开发票",
    "修改地址",
    "改签",
    "退订",
    "充值",
    "提现",
    "注销",
    "投诉",
    "预约",
    "安装",
    "重置密码",
    "修改手机号",
    "申请保修",
    "查询物流",
    "催单",
    "补发",
    "延期",
    "转让",
    "冻结",
    "解冻",
];

const ZH_TOPICS: &[&str] = &[
    "保修",
    "物流",
    "发票",
    "积分",
    "优惠券",
    "运费",
    "售后",
    "订单",
    "账户",
    "密码",
    "支付",
    "配送",
    "价格",
    "库存",
    "质量问题",
    "七天无理由",
    "押金",
    "手续费",
    "到账时间",
    "会员权益",
    "实名认证",
    "验证码",
    "自提",
    "安装费",
    "以旧换新",
    "分期付款",
    "保价",
    "赠品",
    "发货时间",
    "客服电话",
];

const ZH_CHANNELS: &[&str] = &[
    "在线客服",
    "客服热线",
    "官方App",
    "小程序",
    "门店",
    "官网",
    "邮件",
];

const EN_PRODUCTS: &[&str] = &[
    "phone",
    "laptop",
    "tablet",
    "earbuds",
    "smartwatch",
    "router",
    "charger",
    "power bank",
    "monitor",
    "keyboard",
    "mouse",
    "printer",
    "camera",
    "TV",
    "air conditioner",
    "fridge",
    "washing machine",
    "robot vacuum",
    "toothbrush",
    "hair dryer",
    "coffee machine",
    "water filter",
    "membership",
    "gift card",
    "bundle",
    "broadband",
    "data plan",
    "flight",
    "train ticket",
    "hotel booking",
    "rental car",
    "insurance policy",
    "credit card",
    "debit card",
    "savings account",
    "food delivery",
    "grocery order",
    "sofa",
    "mattress",
    "sneakers",
    "skincare set",
    "glasses",
    "suitcase",
    "bicycle",
    "e-scooter",
    "game console",
    "speaker",
    "projector",
    "smart lock",
    "security camera",
    "scale",
    "air purifier",
    "rice cooker",
    "microwave",
    "ebook",
    "cloud storage",
    "streaming subscription",
    "loyalty card",
    "headphones",
    "SIM card",
];

const EN_ACTIONS: &[&str] = &[
    "refund",
    "return",
    "exchange",
    "repair",
    "activate",
    "link",
    "unlink",
    "cancel",
    "upgrade",
    "renew",
    "invoice",
    "change the address of",
    "reschedule",
    "unsubscribe from",
    "top up",
    "withdraw from",
    "close",
    "complain about",
    "book",
    "install",
    "reset the password of",
    "change the phone number on",
    "claim the warranty for",
    "track",
    "expedite",
    "replace",
    "extend",
    "transfer",
    "freeze",
    "unfreeze",
];

const EN_TOPICS: &[&str] = &[
    "warranty",
    "shipping",
    "invoice",
    "points",
    "coupon",
    "delivery fee",
    "after-sales service",
    "order",
    "account",
    "password",
    "payment",
    "delivery",
    "price",
    "stock",
    "defect",
    "return window",
    "deposit",
    "handling fee",
    "processing time",
    "membership benefits",
    "identity verification",
    "verification code",
    "pickup",
    "installation fee",
    "trade-in",
    "installments",
    "price protection",
    "free gift",
    "dispatch time",
    "hotline",
];

const EN_CHANNELS: &[&str] = &[
    "live chat",
    "the hotline",
    "the app",
    "the website",
    "a store",
    "email",
    "the help centre",
];

const BRANDS: &[&str] = &[
    "Nova", "Orion", "Lumi", "Vega", "Kite", "Atlas", "Pico", "Zephyr",
];

const SCENARIOS: &[&str] = &[
    "after_sales",
    "billing",
    "account",
    "logistics",
    "travel",
    "telecom",
    "banking",
    "retail",
];

struct Vocabulary {
    products: &'static [&'static str],
    actions: &'static [&'static str],
    topics: &'static [&'static str],
    channels: &'static [&'static str],
}

const ZH: Vocabulary = Vocabulary {
    products: ZH_PRODUCTS,
    actions: ZH_ACTIONS,
    topics: ZH_TOPICS,
    channels: ZH_CHANNELS,
};

const EN: Vocabulary = Vocabulary {
    products: EN_PRODUCTS,
    actions: EN_ACTIONS,
    topics: EN_TOPICS,
    channels: EN_CHANNELS,
};

/// The words one article or query is about.
struct Subject {
    product: &'static str,
    action: &'static str,
    topic: &'static str,
    channel: &'static str,
    model: String,
    days: usize,
}

fn subject(rng: &mut Rng, vocabulary: &Vocabulary) -> Subject {
    let model = format!(
        "{} {}{}",
        rng.pick(BRANDS),
        rng.pick(&["X", "S", "Pro", "Mini", "Max"]),
        rng.below(40) + 1
    );
    Subject {
        product: rng.pick(vocabulary.products),
        action: rng.pick(vocabulary.actions),
        topic: rng.pick(vocabulary.topics),
        channel: rng.pick(vocabulary.channels),
        model,
        days: rng.below(29) + 2,
    }
}

fn zh_question(rng: &mut Rng, s: &Subject) -> String {
    let (p, a, t) = (s.product, s.action, s.topic);
    match rng.below(10) {
        0 => format!("{p}怎么{a}？"),
        1 => format!("如何{a}我的{p}"),
        2 => format!("{p}的{t}需要多久"),
        3 => format!("我的{p}{a}失败了怎么办"),
        4 => format!("{p}可以{a}吗"),
        5 => format!("为什么{p}无法{a}"),
        6 => format!("{p}{t}政策是什么"),
        7 => format!("{} {p}{t}怎么算", s.model),
        8 => format!("请问{a}{p}要{t}吗"),
        _ => format!("{a}以后{t}多久到"),
    }
}

fn en_question(rng: &mut Rng, s: &Subject) -> String {
    let (p, a, t) = (s.product, s.action, s.topic);
    match rng.below(10) {
        0 => format!("How do I {a} my {p}?"),
        1 => format!("Can I {a} a {p}?"),
        2 => format!("How long does the {t} take for a {p}?"),
        3 => format!("I can't {a} my {p}, what should I do?"),
        4 => format!("What is the {t} policy for the {p}?"),
        5 => format!("Why was my {p} {t} rejected?"),
        6 => format!("Is there a {t} when I {a} the {p}?"),
        7 => format!("{} {p} {t} question", s.model),
        8 => format!("Where can I see the {t} of my {p}?"),
        _ => format!("I want to {a} my {p} please"),
    }
}

fn zh_answer(rng: &mut Rng, s: &Subject) -> String {
    let (p, a, t, c, d) = (s.product, s.action, s.topic, s.channel, s.days);
    let sentences = [
        format!("请在收到{p}后{d}天内通过{c}提交{a}申请。"),
        format!("{p}的{t}一般需要{d}个工作日处理。"),
        format!("如有疑问，请联系{c}，工作时间为每天9点到21点。"),
        format!("会员用户{a}时可免除{t}。"),
        format!("{}型号的{p}支持在{c}自助{a}。", s.model),
        format!("审核通过后款项将原路退回，{t}以实际到账为准。"),
        format!("注意：{a}后原订单的{t}将自动失效。"),
        format!("如果商品存在质量问题，我们将承担{t}。"),
    ];
    let count = 3 + rng.below(4);
    let mut answer = String::new();
    for _ in 0..count {
        answer.push_str(&sentences[rng.below(sentences.len())]);
    }
    answer
}

fn en_answer(rng: &mut Rng, s: &Subject) -> String {
    let (p, a, t, c, d) = (s.product, s.action, s.topic, s.channel, s.days);
    let sentences = [
        format!("You can {a} your {p} within {d} days of delivery through {c}."),
        format!("The {t} for a {p} is usually processed in {d} business days."),
        format!("If you have questions, contact {c} between 9am and 9pm."),
        format!("Members do not pay the {t} when they {a} an item."),
        format!("The {} {p} supports self-service through {c}.", s.model),
        format!(
            "Once approved, the money goes back to the original payment method; the {t} depends on your bank."
        ),
        format!(
            "Note that after you {a} the {p}, the {t} of the original order no longer applies."
        ),
        format!("If the item is faulty, we cover the {t}."),
    ];
    let count = 3 + rng.below(4);
    let mut answer = String::new();
    for _ in 0..count {
        if !answer.is_empty() {
            answer.push(' ');
        }
        answer.push_str(&sentences[rng.below(sentences.len())]);
    }
    answer
}

fn article(rng: &mut Rng, n: usize) -> ArticleDoc {
    let chinese = rng.chance(55);
    let vocabulary = if chinese { &ZH } else { &EN };
    let s = subject(rng, vocabulary);
    let questions = (0..1 + rng.below(4))
        .map(|_| {
            if chinese {
                zh_question(rng, &s)
            } else {
                en_question(rng, &s)
            }
        })
        .collect();
    let (title, answer) = if chinese {
        (format!("{}{}说明", s.product, s.topic), zh_answer(rng, &s))
    } else {
        (
            format!("{} {}: {}", s.product, s.topic, s.action),
            en_answer(rng, &s),
        )
    };
    let tenant = if rng.chance(90) {
        MAIN_TENANT.to_owned()
    } else {
        format!("t{}", rng.below(9) + 1)
    };
    let visibility = match rng.below(100) {
        0..60 => Visibility::Both,
        60..85 => Visibility::Bot,
        _ => Visibility::Agents,
    };
    ArticleDoc {
        tenant,
        article_id: format!("kb-{n:06}"),
        version: 1,
        scenario: rng.pick(SCENARIOS).to_owned(),
        language: if chinese { "zh" } else { "en" }.to_owned(),
        visibility,
        tags: vec![
            rng.pick(&["faq", "policy", "howto", "troubleshooting"])
                .to_owned(),
        ],
        title,
        questions,
        answer,
    }
}

fn corpus(count: usize) -> impl Iterator<Item = ArticleDoc> {
    let mut rng = Rng(SEED);
    (0..count).map(move |n| article(&mut rng, n))
}

fn keywords(rng: &mut Rng, vocabulary: &Vocabulary, words: usize, chinese: bool) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(words);
    for _ in 0..words {
        let part = match rng.below(5) {
            0 | 1 => rng.pick(vocabulary.products).to_owned(),
            2 => rng.pick(vocabulary.actions).to_owned(),
            3 => rng.pick(vocabulary.topics).to_owned(),
            _ => rng.pick(BRANDS).to_owned(),
        };
        parts.push(part);
    }
    // Chinese users rarely type spaces between words.
    parts.join(if chinese && rng.chance(70) { "" } else { " " })
}

fn queries(count: usize) -> Vec<SearchRequest> {
    let mut rng = Rng(SEED ^ 0x5151_5151);
    (0..count)
        .map(|_| {
            let chinese = rng.chance(55);
            let vocabulary = if chinese { &ZH } else { &EN };
            let text = match rng.below(10) {
                // A question phrased like the articles', about a random subject.
                0..5 => {
                    let s = subject(&mut rng, vocabulary);
                    if chinese {
                        zh_question(&mut rng, &s)
                    } else {
                        en_question(&mut rng, &s)
                    }
                }
                // Keyword bags of one to six words.
                _ => {
                    let words = 1 + rng.below(6);
                    keywords(&mut rng, vocabulary, words, chinese)
                }
            };
            let audience = if rng.chance(70) {
                Audience::Bot
            } else {
                Audience::Agent
            };
            let mut request = SearchRequest::new(MAIN_TENANT, text, audience);
            if rng.chance(20) {
                request.scenario = Some(rng.pick(SCENARIOS).to_owned());
            }
            if rng.chance(30) {
                request.language = Some(if chinese { "zh" } else { "en" }.to_owned());
            }
            request
        })
        .collect()
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Returns (VmRSS, VmHWM) in MiB from /proc/self/status, when available.
fn memory_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Returns the process's user + system CPU time, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Returns the 1-minute load average, to judge how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print_memory(label: &str) {
    match memory_mib() {
        Some((rss, hwm)) => println!("memory {label}: rss {rss:.0} MiB, peak {hwm:.0} MiB"),
        None => println!("memory {label}: /proc/self/status unavailable"),
    }
}

fn print_latency(label: &str, histogram: &Histogram<u64>) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{label}: n={} p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms, mean {:.3} ms",
        histogram.len(),
        ms(histogram.value_at_quantile(0.50)),
        ms(histogram.value_at_quantile(0.90)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
        histogram.mean() / 1000.0,
    );
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s with three significant digits; construction cannot fail with these bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// Latency and outcome counts of one pass over a query set.
struct Pass {
    all: Histogram<u64>,
    zh: Histogram<u64>,
    en: Histogram<u64>,
    hits: usize,
    no_good: usize,
    empty: usize,
    cpu: Option<Duration>,
    wall: Duration,
}

/// Runs every request `repeats` times and records the fastest run of each: with one repeat the
/// plain latency, with more an estimate of the latency without interference from other
/// processes on the shared machine.
fn run_pass(
    index: &SearchIndex,
    requests: &[SearchRequest],
    repeats: usize,
) -> Result<Pass, SearchError> {
    let mut pass = Pass {
        all: histogram(),
        zh: histogram(),
        en: histogram(),
        hits: 0,
        no_good: 0,
        empty: 0,
        cpu: None,
        wall: Duration::ZERO,
    };
    let cpu_before = cpu_time();
    let wall_before = Instant::now();
    for request in requests {
        let mut fastest = u64::MAX;
        for _ in 0..repeats {
            let started = Instant::now();
            let outcome = index.search(request);
            fastest = fastest.min(started.elapsed().as_micros().max(1) as u64);
            match outcome {
                Ok(response) if repeats == 1 => {
                    pass.hits += response.hits.len();
                    pass.no_good += usize::from(response.no_good_result);
                }
                Ok(_) => {}
                Err(SearchError::EmptyQuery) => pass.empty += usize::from(repeats == 1),
                Err(error) => return Err(error),
            }
        }
        pass.all.saturating_record(fastest);
        let chinese = request
            .query
            .chars()
            .any(|c| ('\u{4E00}'..='\u{9FFF}').contains(&c));
        if chinese {
            pass.zh.saturating_record(fastest);
        } else {
            pass.en.saturating_record(fastest);
        }
    }
    pass.wall = wall_before.elapsed();
    if let (Some(before), Some(after)) = (cpu_before, cpu_time()) {
        pass.cpu = Some(after.saturating_sub(before));
    }
    Ok(pass)
}

fn print_pass(label: &str, pass: &Pass, searches: usize) {
    print_latency(&format!("{label} all"), &pass.all);
    print_latency(&format!("{label} zh "), &pass.zh);
    print_latency(&format!("{label} en "), &pass.en);
    if let Some(cpu) = pass.cpu {
        println!(
            "{label} cpu: {:.3} ms of cpu per search, process used {:.0}% of a core",
            cpu.as_secs_f64() * 1000.0 / searches as f64,
            100.0 * cpu.as_secs_f64() / pass.wall.as_secs_f64(),
        );
    }
}

fn main() -> Result<(), SearchError> {
    let articles = env_count("SEARCH_BENCH_ARTICLES", 100_000);
    let query_count = env_count("SEARCH_BENCH_QUERIES", 2_000);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "tandem-search bench: {articles} articles, {query_count} queries, {cores} cores, \
         load average {}",
        load_average()
    );

    tandem_search::warm_up();
    print_memory("after dictionary load");

    let strategy = match std::env::var("SEARCH_BENCH_STRATEGY").as_deref() {
        Ok("intersect") => FilterStrategy::Intersect,
        Ok("post") => FilterStrategy::PostFilter,
        _ => FilterStrategy::Auto,
    };
    let config = IndexConfig {
        filter_strategy: strategy,
        ..IndexConfig::default()
    };
    println!(
        "config: commit interval {} ms, max pending {}, writer {} MB on {} thread(s), \
         filters {strategy:?}, common term share {}",
        config.commit_interval.as_millis(),
        config.max_pending_ops,
        config.writer_memory_bytes / 1_000_000,
        config.indexing_threads,
        config.common_term_share,
    );
    let index = SearchIndex::in_ram(config)?;

    let started = Instant::now();
    let report = index.rebuild(corpus(articles))?;
    let elapsed = started.elapsed();
    let stats = index.stats();
    println!(
        "rebuild: {} docs in {:.2} s = {:.0} docs/s, {} segment(s), {} rejected",
        report.indexed,
        elapsed.as_secs_f64(),
        report.indexed as f64 / elapsed.as_secs_f64(),
        stats.num_segments,
        report.rejected,
    );
    print_memory("after rebuild");

    let requests = queries(query_count);
    for request in requests.iter().cycle().take(WARM_UP_QUERIES) {
        index.search(request)?;
    }
    let pass = run_pass(&index, &requests, 1)?;
    print_pass("search (top 10 + snippets)", &pass, requests.len());
    println!(
        "search results: {:.1} hits/query, {:.1}% flagged no_good_result, {} empty queries",
        pass.hits as f64 / requests.len() as f64,
        100.0 * pass.no_good as f64 / requests.len() as f64,
        pass.empty,
    );
    let best = run_pass(&index, &requests, 3)?;
    print_pass("search best of 3", &best, 3 * requests.len());

    // A tenant holding about 1 % of the documents: its filter is selective.
    let small: Vec<SearchRequest> = requests
        .iter()
        .take(SMALL_TENANT_QUERIES)
        .map(|r| SearchRequest {
            tenant: SMALL_TENANT.to_owned(),
            ..r.clone()
        })
        .collect();
    let pass = run_pass(&index, &small, 1)?;
    print_pass("small tenant", &pass, small.len());
    print_memory("after searches");

    // Incremental path: new versions of existing articles, as fast as the queue takes them.
    let started = Instant::now();
    let mut last = 0;
    let commits_before = index.stats().commits;
    let updates = INCREMENTAL_UPSERTS.min(articles);
    for mut doc in corpus(updates) {
        doc.version = 2;
        doc.answer.push_str(" Updated.");
        last = index.upsert(doc)?;
    }
    index.wait_visible(last, Duration::from_secs(120))?;
    let elapsed = started.elapsed();
    let stats = index.stats();
    println!(
        "incremental: {updates} upserts visible in {:.2} s = {:.0} docs/s, {} commits, {} segments",
        elapsed.as_secs_f64(),
        updates as f64 / elapsed.as_secs_f64(),
        stats.commits - commits_before,
        stats.num_segments,
    );

    // Freshness: one new article at a time, at a random point of the commit cycle.
    let mut rng = Rng(SEED ^ 0xF4E5);
    let mut visible = histogram();
    let mut found = histogram();
    let mut missing = 0usize;
    for trial in 0..FRESHNESS_TRIALS {
        std::thread::sleep(Duration::from_millis(rng.below(50) as u64));
        let marker = format!("freshmarker{trial}");
        let mut doc = article(&mut rng, articles + trial);
        doc.tenant = MAIN_TENANT.to_owned();
        doc.visibility = Visibility::Both;
        doc.questions.push(format!("{marker} question"));
        let article_id = doc.article_id.clone();
        let started = Instant::now();
        let seq = index.upsert(doc)?;
        index.wait_visible(seq, Duration::from_secs(10))?;
        visible.saturating_record(started.elapsed().as_micros().max(1) as u64);
        let response = index.search(&SearchRequest::new(MAIN_TENANT, &marker, Audience::Bot))?;
        let micros = started.elapsed().as_micros().max(1) as u64;
        if response
            .hits
            .first()
            .is_some_and(|hit| hit.article_id == article_id)
        {
            found.saturating_record(micros);
        } else {
            missing += 1;
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "freshness (upsert -> top hit of a search, {} of {FRESHNESS_TRIALS} trials found, \
         {missing} not found): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms \
         (visible: p50 {:.1} ms, p95 {:.1} ms)",
        found.len(),
        ms(&found, 0.5),
        ms(&found, 0.95),
        found.max() as f64 / 1000.0,
        ms(&visible, 0.5),
        ms(&visible, 0.95),
    );
    print_memory("at end");
    println!("load average at end {}", load_average());
    index.close()
}
