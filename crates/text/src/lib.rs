//! Text processing shared by dialog, knowledge and feedback: normalisation, language
//! identification, tokenising (jieba words and character n-grams for Chinese, words for English)
//! and lexicons. It grows with the services that use it; it never depends on a service.
