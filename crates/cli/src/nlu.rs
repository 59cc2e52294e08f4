//! `tandem nlu`: train and measure the built-in language understanding on labelled CSV files,
//! and show what it makes of a message.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use tandem_nlu::{
    Analyzer, ColumnOrder, ConversationSignals, Evaluation, FeatureConfig, LabelledText,
    TextClassifier, TrainingOptions, read_labelled_csv, stratified_split,
};

/// Options of `tandem nlu`.
#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    command: NluCommand,
}

#[derive(clap::Subcommand)]
enum NluCommand {
    /// Trains an intent model and prints accuracy, macro-F1 and training time.
    Eval(EvalOptions),
    /// Trains the TF-IDF sentiment classifier on a stratified split and prints its accuracy.
    SentimentEval(SentimentOptions),
    /// Prints the analysis of one message as JSON.
    Analyse(AnalyseOptions),
}

#[derive(clap::Args)]
struct EvalOptions {
    /// Training CSV with a header line.
    #[arg(long)]
    train: PathBuf,
    /// Test CSV; without it, a stratified share of the training file is held out instead.
    #[arg(long)]
    test: Option<PathBuf>,
    /// Column order of both files: `text,label` or `label,text`.
    #[arg(long, default_value = "text,label")]
    columns: String,
    /// Share of the training file held out when there is no test file.
    #[arg(long, default_value_t = 0.2)]
    validation: f64,
    /// Seed of the held-out split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Inverse regularisation strength.
    #[arg(long, default_value_t = 20.0)]
    c: f32,
    /// Prints precision, recall and F1 of every intent.
    #[arg(long)]
    per_intent: bool,
    /// Number of most frequent confusions to print.
    #[arg(long, default_value_t = 10)]
    confusions: usize,
    /// Writes the trained model to this file (stored format).
    #[arg(long)]
    save: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SentimentOptions {
    /// Labelled CSV with a header line.
    #[arg(long)]
    data: PathBuf,
    /// Column order: `label,text` or `text,label`.
    #[arg(long)]
    columns: String,
    /// Share of each label used for training; the rest is the test set.
    #[arg(long, default_value_t = 0.8)]
    split: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(clap::Args)]
struct AnalyseOptions {
    /// A stored intent model (from `tandem nlu eval --save`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sentiment scores of earlier customer turns, oldest first (comma-separated).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    history: Vec<f32>,
    /// Bot fallbacks in a row before this message.
    #[arg(long, default_value_t = 0)]
    fallbacks: u32,
    /// The customer message.
    message: String,
}

/// Runs a `tandem nlu` command.
pub fn run(options: Options) -> anyhow::Result<()> {
    match options.command {
        NluCommand::Eval(options) => eval(options),
        NluCommand::SentimentEval(options) => sentiment_eval(options),
        NluCommand::Analyse(options) => analyse(options),
    }
}

fn read(path: &Path, columns: ColumnOrder) -> anyhow::Result<Vec<LabelledText>> {
    let examples = read_labelled_csv(path, columns)?;
    anyhow::ensure!(!examples.is_empty(), "{} has no examples", path.display());
    Ok(examples)
}

fn split(
    examples: &[LabelledText],
    share: f64,
    seed: u64,
) -> anyhow::Result<(Vec<LabelledText>, Vec<LabelledText>)> {
    anyhow::ensure!(
        share > 0.0 && share < 1.0,
        "the split share must lie strictly in (0, 1)"
    );
    let labels: Vec<&str> = examples.iter().map(|e| e.label.as_str()).collect();
    let (first, second) = stratified_split(&labels, share, seed);
    let pick = |rows: &[usize]| {
        rows.iter()
            .map(|&i| examples[i].clone())
            .collect::<Vec<_>>()
    };
    Ok((pick(&first), pick(&second)))
}

fn eval(options: EvalOptions) -> anyhow::Result<()> {
    let columns: ColumnOrder = options.columns.parse()?;
    let all = read(&options.train, columns)?;
    let (train, test, test_name) = match &options.test {
        Some(path) => (all, read(path, columns)?, path.display().to_string()),
        None => {
            let (train, held) = split(&all, 1.0 - options.validation, options.seed)?;
            let name = format!(
                "{:.0} % held out of the training file",
                options.validation * 100.0
            );
            (train, held, name)
        }
    };
    println!(
        "train: {} examples ({})",
        train.len(),
        options.train.display()
    );
    println!("test:  {} examples ({test_name})", test.len());
    let mut training = TrainingOptions::default();
    training.linear.c = options.c;
    let started = Instant::now();
    let model = TextClassifier::train(&train, &[], &training)?;
    let elapsed = started.elapsed();
    let evaluation = model.evaluate(&test);
    print_evaluation(&evaluation);
    let summary = model.summary();
    println!(
        "training time: {:.2} s ({} labels, {} features, final fit {} iterations)",
        elapsed.as_secs_f64(),
        model.labels().len(),
        summary.features,
        summary.final_fit.iterations
    );
    println!(
        "calibration: temperature {:.3}, out-of-scope threshold {:.3}, minimum word coverage {:.2}",
        model.temperature(),
        model.out_of_scope_threshold(),
        model.min_word_coverage()
    );
    if options.per_intent {
        println!(
            "{:<45} {:>9} {:>9} {:>9} {:>8}",
            "intent", "precision", "recall", "F1", "support"
        );
        for class in &evaluation.classes {
            println!(
                "{:<45} {:>9.3} {:>9.3} {:>9.3} {:>8}",
                class.label, class.precision, class.recall, class.f1, class.support
            );
        }
    }
    if options.confusions > 0 && !evaluation.confusions.is_empty() {
        println!("most frequent confusions (true -> predicted):");
        for confusion in evaluation.confusions.iter().take(options.confusions) {
            println!(
                "  {:>4}  {} -> {}",
                confusion.count, confusion.gold, confusion.predicted
            );
        }
    }
    if let Some(path) = options.save {
        let bytes = model.to_bytes()?;
        std::fs::write(&path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!(
            "model written to {} ({} bytes)",
            path.display(),
            bytes.len()
        );
    }
    Ok(())
}

fn print_evaluation(evaluation: &Evaluation) {
    println!("accuracy: {:.2} %", 100.0 * evaluation.accuracy);
    println!("macro-F1: {:.2} %", 100.0 * evaluation.macro_f1);
}

fn sentiment_eval(options: SentimentOptions) -> anyhow::Result<()> {
    let columns: ColumnOrder = options.columns.parse()?;
    let all = read(&options.data, columns)?;
    let (train, test) = split(&all, options.split, options.seed)?;
    println!(
        "{}: {} examples, stratified split {:.0}/{:.0} with seed {}: {} train, {} test",
        options.data.display(),
        all.len(),
        options.split * 100.0,
        (1.0 - options.split) * 100.0,
        options.seed,
        train.len(),
        test.len()
    );
    let training = TrainingOptions {
        features: FeatureConfig::sentiment(),
        ..Default::default()
    };
    let started = Instant::now();
    let model = TextClassifier::train(&train, &[], &training)?;
    let elapsed = started.elapsed();
    print_evaluation(&model.evaluate(&test));
    println!("training time: {:.2} s", elapsed.as_secs_f64());
    Ok(())
}

fn analyse(options: AnalyseOptions) -> anyhow::Result<()> {
    let mut analyzer = Analyzer::new();
    if let Some(path) = &options.model {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let model = TextClassifier::from_bytes(&bytes)
            .with_context(|| format!("{} is not a usable model", path.display()))?;
        analyzer = analyzer.with_intent_model(model);
    }
    let signals = ConversationSignals {
        previous_sentiment: options.history,
        consecutive_fallbacks: options.fallbacks,
        repeat_contacts: 0,
    };
    let analysis = analyzer.analyse(&options.message, &signals);
    println!("{}", serde_json::to_string_pretty(&analysis)?);
    Ok(())
}
