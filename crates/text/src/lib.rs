//! Text processing shared by dialog, knowledge and feedback.
