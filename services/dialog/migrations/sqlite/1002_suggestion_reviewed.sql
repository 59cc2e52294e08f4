-- Whether a suggestion has its review, as a column, so recording a review is one conditional
-- write: a second review of the same suggestion changes nothing. Suggestions stored before this
-- migration start as not reviewed; the service also reads the review from the body.

ALTER TABLE dialog_suggestions ADD COLUMN reviewed BOOLEAN NOT NULL DEFAULT FALSE;
