//! Behaviour of the crate as the dialog service uses it: training on a small bilingual set of
//! intents, predicting, rejecting unrelated text, storing and loading models, and analysing
//! whole turns.

#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;

use tandem_nlu::{
    Analyzer, ConversationSignals, Emotion, EntityValue, LabelledText, MODEL_FORMAT_VERSION,
    NluError, ScopeDetectorOptions, TextClassifier, TrainingOptions,
};
use tandem_text::Language;

/// A dozen intents, each with a few English and Chinese examples, written for this test.
const EXAMPLES: &[(&str, &str)] = &[
    ("order_status", "where is my order"),
    ("order_status", "has my package shipped yet"),
    ("order_status", "track my parcel please"),
    ("order_status", "我的订单到哪了"),
    ("order_status", "快递什么时候到"),
    ("order_status", "帮我查一下物流"),
    ("refund", "I want a refund"),
    ("refund", "how do I get my money back"),
    ("refund", "when will the refund arrive"),
    ("refund", "我要退款"),
    ("refund", "退款什么时候到账"),
    ("refund", "钱怎么还没退回来"),
    ("cancel_order", "cancel my order"),
    (
        "cancel_order",
        "I no longer want this order, please cancel it",
    ),
    ("cancel_order", "can I cancel the purchase"),
    ("cancel_order", "我要取消订单"),
    ("cancel_order", "订单不要了帮我取消"),
    ("cancel_order", "怎么取消订单"),
    ("change_address", "change my delivery address"),
    ("change_address", "I moved, update the shipping address"),
    ("change_address", "wrong address on the order"),
    ("change_address", "修改收货地址"),
    ("change_address", "地址填错了怎么改"),
    ("change_address", "我搬家了要换地址"),
    ("payment_failed", "my payment failed"),
    ("payment_failed", "card was declined at checkout"),
    (
        "payment_failed",
        "can't pay, the payment does not go through",
    ),
    ("payment_failed", "付款失败了"),
    ("payment_failed", "支付不了怎么办"),
    ("payment_failed", "银行卡支付一直失败"),
    ("invoice", "I need an invoice"),
    ("invoice", "send me a receipt for my purchase"),
    ("invoice", "how do I download the invoice"),
    ("invoice", "我要开发票"),
    ("invoice", "发票怎么开"),
    ("invoice", "电子发票在哪里下载"),
    ("password_reset", "I forgot my password"),
    ("password_reset", "reset my password"),
    ("password_reset", "can't log in, password not working"),
    ("password_reset", "忘记密码了"),
    ("password_reset", "怎么重置密码"),
    ("password_reset", "密码登录不了"),
    ("greeting", "hello"),
    ("greeting", "hi there"),
    ("greeting", "good morning"),
    ("greeting", "你好"),
    ("greeting", "在吗"),
    ("greeting", "您好,请问有人吗"),
    ("thanks", "thank you"),
    ("thanks", "thanks a lot, that helped"),
    ("thanks", "great, thanks for your help"),
    ("thanks", "谢谢"),
    ("thanks", "非常感谢"),
    ("thanks", "好的谢谢你"),
    ("coupon", "how do I use a coupon"),
    ("coupon", "my discount code doesn't work"),
    ("coupon", "where can I enter the promo code"),
    ("coupon", "优惠券怎么用"),
    ("coupon", "优惠码无效"),
    ("coupon", "领的券用不了"),
    ("damaged_item", "the item arrived broken"),
    ("damaged_item", "package was damaged"),
    ("damaged_item", "the product is defective"),
    ("damaged_item", "收到的东西坏了"),
    ("damaged_item", "商品破损了"),
    ("damaged_item", "屏幕是碎的"),
    ("delete_account", "delete my account"),
    ("delete_account", "close my account permanently"),
    ("delete_account", "how do I remove my account"),
    ("delete_account", "注销账号"),
    ("delete_account", "我要注销账户"),
    ("delete_account", "怎么删除我的账号"),
];

fn examples() -> Vec<LabelledText> {
    EXAMPLES
        .iter()
        .map(|(label, text)| LabelledText::new(*text, *label))
        .collect()
}

static MODEL: LazyLock<TextClassifier> =
    LazyLock::new(|| TextClassifier::train(&examples(), &[], &TrainingOptions::default()).unwrap());

#[test]
fn predicts_intents_of_new_bilingual_phrasings() {
    let cases = [
        ("where is my parcel?", "order_status"),
        ("I'd like a refund please", "refund"),
        ("please cancel the order", "cancel_order"),
        ("need to change the address", "change_address"),
        ("the payment keeps failing", "payment_failed"),
        ("can you send the invoice", "invoice"),
        ("forgot password", "password_reset"),
        ("Thanks!", "thanks"),
        ("promo code not working", "coupon"),
        ("my order arrived damaged", "damaged_item"),
        ("我的快递到哪了", "order_status"),
        ("申请退款", "refund"),
        ("取消这个订单", "cancel_order"),
        ("收货地址要改一下", "change_address"),
        ("开一张发票", "invoice"),
        ("密码忘了", "password_reset"),
        ("谢谢你", "thanks"),
        ("这个优惠券不能用", "coupon"),
        ("账号要注销", "delete_account"),
    ];
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let prediction = MODEL.predict(text);
        if prediction.ranked[0].label != expected || prediction.out_of_scope {
            wrong.push(format!("{text}: {prediction:?}"));
        }
    }
    assert!(wrong.is_empty(), "wrong predictions:\n{}", wrong.join("\n"));
}

#[test]
fn rejects_unrelated_text_as_out_of_scope() {
    for text in [
        "what is the capital of mongolia",
        "recommend a good science fiction novel",
        "今天股市行情怎么样",
        "明天北京会下雪吗",
    ] {
        let prediction = MODEL.predict(text);
        assert!(prediction.out_of_scope, "{text}: {prediction:?}");
        assert!(prediction.accepted_label().is_none());
    }
    let threshold = MODEL.out_of_scope_threshold();
    assert!(threshold > 0.0 && threshold < 1.0, "{threshold}");
}

#[test]
fn learns_an_out_of_scope_detector_from_pseudo_out_of_scope_examples() {
    // The default needs 1,000 examples; the small set gets the confidence threshold.
    assert!(MODEL.out_of_scope_detector().is_none());
    let options = TrainingOptions {
        out_of_scope_detector: ScopeDetectorOptions {
            min_examples: 0,
            ..ScopeDetectorOptions::default()
        },
        ..TrainingOptions::default()
    };
    let model = TextClassifier::train(&examples(), &[], &options).unwrap();
    let detector = model.out_of_scope_detector().unwrap();
    assert_eq!(detector.groups, 3);
    // Every example of a left-out group is pseudo out of scope once.
    assert_eq!(detector.pseudo_out_of_scope, EXAMPLES.len());
    assert!(detector.pseudo_in_scope > 0);
    for text in ["where is my order", "我要退款", "今天股市行情怎么样", "!!"] {
        let prediction = model.predict(text);
        assert!(
            (0.0..=1.0).contains(&prediction.scope_score),
            "{prediction:?}"
        );
        assert_eq!(
            prediction.out_of_scope,
            prediction.scope_score < model.out_of_scope_threshold()
                || prediction.word_coverage < model.min_word_coverage()
        );
    }
    for text in ["what is the capital of mongolia", "明天北京会下雪吗"] {
        assert!(model.predict(text).out_of_scope, "{text}");
    }
    let loaded = TextClassifier::from_bytes(&model.to_bytes().unwrap()).unwrap();
    assert_eq!(&loaded, &model);
    let again = TextClassifier::train(&examples(), &[], &options).unwrap();
    for text in ["where is my order", "我要退款", "random words"] {
        assert_eq!(again.predict(text), model.predict(text));
    }
    assert_eq!(again.out_of_scope_detector(), model.out_of_scope_detector());
    let one_group = TrainingOptions {
        out_of_scope_detector: ScopeDetectorOptions {
            groups: 1,
            ..ScopeDetectorOptions::default()
        },
        ..TrainingOptions::default()
    };
    assert!(matches!(
        TextClassifier::train(&examples(), &[], &one_group),
        Err(NluError::InvalidArgument(_))
    ));
}

#[test]
fn returns_ranked_calibrated_probabilities() {
    let prediction = MODEL.predict("where is my order");
    assert_eq!(prediction.ranked.len(), 5);
    assert!(
        prediction
            .ranked
            .windows(2)
            .all(|w| w[0].probability >= w[1].probability)
    );
    assert!((prediction.confidence - prediction.ranked[0].probability).abs() < f32::EPSILON);
    let all = MODEL.probabilities("where is my order");
    assert_eq!(all.len(), MODEL.labels().len());
    assert!((all.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    assert!(MODEL.temperature() > 0.0);
    let summary = MODEL.summary();
    assert_eq!(summary.examples, EXAMPLES.len());
    assert!(summary.held_out > 0);
}

#[test]
fn round_trips_through_the_stored_format() {
    let bytes = MODEL.to_bytes().unwrap();
    assert_eq!(&bytes[..4], b"TNLU");
    assert_eq!(
        u16::from_le_bytes([bytes[4], bytes[5]]),
        MODEL_FORMAT_VERSION
    );
    let loaded = TextClassifier::from_bytes(&bytes).unwrap();
    assert_eq!(&loaded, &*MODEL);
    for text in ["where is my order", "我要退款", "random words"] {
        assert_eq!(loaded.predict(text), MODEL.predict(text));
    }
}

#[test]
fn refuses_damaged_or_foreign_model_bytes() {
    let bytes = MODEL.to_bytes().unwrap();
    assert!(matches!(
        TextClassifier::from_bytes(b"nope"),
        Err(NluError::InvalidModel(_))
    ));
    assert!(matches!(
        TextClassifier::from_bytes(&bytes[..5]),
        Err(NluError::InvalidModel(_))
    ));
    let mut newer = bytes.clone();
    newer[4..6].copy_from_slice(&(MODEL_FORMAT_VERSION + 1).to_le_bytes());
    assert!(matches!(
        TextClassifier::from_bytes(&newer),
        Err(NluError::UnsupportedModelVersion { .. })
    ));
    let truncated = &bytes[..bytes.len() / 2];
    assert!(TextClassifier::from_bytes(truncated).is_err());
}

#[test]
fn trains_deterministically() {
    let again = TextClassifier::train(&examples(), &[], &TrainingOptions::default()).unwrap();
    // Everything but the wall-clock training time in the summary is the same.
    for text in ["where is my order", "我要退款", "random words"] {
        assert_eq!(again.probabilities(text), MODEL.probabilities(text));
    }
    assert_eq!(
        again.out_of_scope_threshold(),
        MODEL.out_of_scope_threshold()
    );
    assert_eq!(again.temperature(), MODEL.temperature());
    assert_eq!(again.summary().final_fit, MODEL.summary().final_fit);
}

#[test]
fn rejects_unusable_training_sets() {
    let one_label = [LabelledText::new("a", "x"), LabelledText::new("b", "x")];
    assert!(matches!(
        TextClassifier::train(&one_label, &[], &TrainingOptions::default()),
        Err(NluError::InvalidTrainingSet(_))
    ));
    let blank = [LabelledText::new("  ", "x"), LabelledText::new("b", "y")];
    assert!(TextClassifier::train(&blank, &[], &TrainingOptions::default()).is_err());
    let options = TrainingOptions {
        held_out_share: 0.95,
        ..TrainingOptions::default()
    };
    assert!(TextClassifier::train(&examples(), &[], &options).is_err());
}

#[test]
fn analyses_a_chinese_turn_end_to_end() {
    let analyzer = Analyzer::new().with_intent_model(MODEL.clone());
    let signals = ConversationSignals {
        previous_sentiment: vec![0.4, 0.3],
        consecutive_fallbacks: 1,
        repeat_contacts: 0,
    };
    let message = "订单号ＡＢ１２３４５６７８三天了还没到，太慢了！我要投诉，转人工";
    let turn = analyzer.analyse(message, &signals);
    assert_eq!(turn.language.language, Language::Zh);
    assert!(turn.normalised.contains("ab12345678"));
    assert!(turn.tokens.iter().any(|t| t == "投诉"), "{:?}", turn.tokens);
    assert!(turn.escalation.human_requested);
    assert!(turn.escalation.complaint);
    assert!(turn.sentiment.score < -0.3, "{:?}", turn.sentiment);
    assert_eq!(
        turn.sentiment.emotion,
        Emotion::Frustration,
        "{:?}",
        turn.sentiment
    );
    assert!(turn.trend.swing, "{:?}", turn.trend);
    let order = &turn.entities[0];
    assert_eq!(
        order.value,
        EntityValue::OrderNumber {
            number: "AB12345678".to_owned()
        }
    );
    assert_eq!(&message[order.start..order.end], "ＡＢ１２３４５６７８");
    assert!(turn.intent.is_some());
    assert!(turn.complexity.score > 0.0 && turn.complexity.score <= 1.0);
    assert_eq!(turn.complexity.factors.len(), 5);
}

#[test]
fn analyses_an_english_turn_without_an_intent_model() {
    let turn = Analyzer::new().analyse(
        "Thanks, that fixed it! I don't need an agent anymore.",
        &ConversationSignals::default(),
    );
    assert_eq!(turn.language.language, Language::En);
    assert!(turn.intent.is_none());
    assert!(!turn.escalation.human_requested);
    assert!(turn.sentiment.score > 0.3, "{:?}", turn.sentiment);
    assert_eq!(turn.sentiment.emotion, Emotion::Satisfaction);
    assert!(!turn.trend.swing);
    assert_eq!(turn.trend.turns, 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    #[test]
    fn probabilities_sum_to_one_for_any_text(text in "\\PC{0,80}") {
        let probabilities = MODEL.probabilities(&tandem_text::normalise(&text));
        let sum: f32 = probabilities.iter().sum();
        proptest::prop_assert!((sum - 1.0).abs() < 1e-4, "sum {sum}");
        proptest::prop_assert!(probabilities.iter().all(|p| (0.0..=1.0).contains(p)));
        let prediction = MODEL.predict(&text);
        proptest::prop_assert!((0.0..=1.0).contains(&prediction.spread));
    }

    #[test]
    fn analysing_never_panics(text in "\\PC{0,120}", history in proptest::collection::vec(-1.0f32..1.0, 0..6)) {
        let analyzer = Analyzer::new().with_intent_model(MODEL.clone());
        let signals = ConversationSignals { previous_sentiment: history, ..ConversationSignals::default() };
        let turn = analyzer.analyse(&text, &signals);
        proptest::prop_assert!((-1.0..=1.0).contains(&turn.sentiment.score));
        proptest::prop_assert!((0.0..=1.0).contains(&turn.complexity.score));
        for entity in &turn.entities {
            proptest::prop_assert_eq!(text.get(entity.start..entity.end), Some(entity.text.as_str()));
        }
    }
}
