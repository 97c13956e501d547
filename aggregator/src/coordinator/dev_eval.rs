//! Model selection's hooks in the round state machine: dev evaluations arriving on
//! `eval/{client}` go to [`crate::selection`], a finished tally becomes an
//! [`AggEvent::DevEvaluated`], and the open tallies are closed at shutdown. Reports never touch
//! the training state.

use fwdllm_shared::wire::{self, EvalReport};
use log::warn;

use super::{AggEvent, Coordinator};
use crate::selection::{BestRecord, SelectionError};
use crate::state::StateError;

impl Coordinator {
    /// The best version on the agents' dev subsets so far (model selection), if any.
    pub fn best(&self) -> Option<&BestRecord> {
        self.selection.best()
    }

    /// Scores the dev tallies still open with the reports they have (at shutdown).
    pub fn close_selection(&mut self) -> Result<(), StateError> {
        if let Some(rec) = self.selection.close_all()? {
            self.dev_evaluated(&rec);
        }
        Ok(())
    }

    pub(super) fn dev_evaluated(&mut self, rec: &BestRecord) {
        let best = self.selection.best().map(|b| b.model_version) == Some(rec.model_version);
        self.events.push(AggEvent::DevEvaluated {
            version: rec.model_version,
            accuracy: rec.dev_accuracy,
            loss: rec.dev_loss,
            best,
        });
    }

    /// A dev evaluation arrived on `eval/{client_id}` (model selection). Bad or unexpected
    /// reports are logged and dropped; they never touch the training state.
    pub fn on_eval(&mut self, client_id: &str, payload: &[u8]) {
        let r = match wire::decode::<EvalReport>(payload) {
            Ok(r) if r.client_id == client_id => r,
            Ok(r) => {
                warn!(client = client_id; "eval report on the topic of {client_id} names client {:?}; ignored", r.client_id);
                return;
            }
            Err(e) => {
                warn!(client = client_id; "undecodable eval report from {client_id}: {e}");
                return;
            }
        };
        match self.selection.on_report(&r) {
            Ok(Some(rec)) => self.dev_evaluated(&rec),
            Ok(None) => {}
            Err(SelectionError::Rejected(why)) => {
                warn!(client = client_id; "eval report from {client_id} ignored: {why}")
            }
            Err(SelectionError::State(e)) => {
                warn!("writing the best version: {e}; export falls back to the last version")
            }
        }
    }
}
