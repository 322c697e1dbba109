//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the
//! holder renews the Lease every round; a candidate takes it over only after watching
//! it unchanged for a whole lease duration on its own clock (no trust in another
//! machine's timestamps), and every write carries the `resourceVersion` it read, so of
//! two candidates exactly one succeeds. The Lease also carries the leader's decision
//! state (an annotation), so a new leader goes on where the old one stopped.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

/// The annotation holding the leader's decision state.
pub const STATE_ANNOTATION: &str = "braid.dev/fleet-state";

/// The largest state carried (the API server refuses annotations past 256 KiB in all).
/// A larger one is left out, and the Lease still renewed: a new leader then starts
/// its tally afresh, so leadership never fails for want of room.
pub const MAX_STATE_BYTES: usize = 200 * 1024;

/// What one round of election found.
#[derive(Debug, PartialEq)]
pub enum Role {
    /// This replica holds the lease. `took_over` is set on the round it became the
    /// leader: the state the Lease carried (the last leader's), if any.
    Leader { took_over: Option<Option<String>> },
    /// Another replica holds it (or the write raced and lost).
    Follower { holder: Option<String> },
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The resourceVersion last seen of someone else's lease, and when it was seen
    /// to change.
    observed: Option<(String, Instant)>,
    leading: bool,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: None,
            leading: false,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: renew (storing `state`) or try to acquire.
    pub async fn tick(&mut self, state: Option<&str>) -> Result<Role, kube::Error> {
        let role = self.try_tick(state).await;
        self.leading = matches!(role, Ok(Role::Leader { .. }));
        role
    }

    async fn try_tick(&mut self, state: Option<&str>) -> Result<Role, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let secs = self.duration.as_secs().clamp(1, i32::MAX as u64) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Role::Leader {
                    took_over: Some(None),
                }),
                Err(e) if conflict(&e) => Ok(Role::Follower { holder: None }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let carried = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATE_ANNOTATION).cloned());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine {
            let rv = lease.metadata.resource_version.clone().unwrap_or_default();
            match &self.observed {
                Some((seen, _)) if *seen == rv => {}
                _ => self.observed = Some((rv, Instant::now())),
            }
            let their = spec
                .lease_duration_seconds
                .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
            let expired = holder.is_none()
                || self
                    .observed
                    .as_ref()
                    .is_some_and(|(_, at)| at.elapsed() >= their);
            if !expired {
                return Ok(Role::Follower { holder });
            }
        }
        let took_over = (!mine || !self.leading).then(|| carried.clone());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(
                spec.lease_transitions.unwrap_or(0) + i32::from(!mine && holder.is_some()),
            ),
            ..spec
        });
        // A leader that just took over writes the state it found back unchanged: its
        // own starts from it.
        if let (Some(s), false) = (state, took_over.is_some()) {
            let annotations = lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default);
            if s.len() <= MAX_STATE_BYTES {
                annotations.insert(STATE_ANNOTATION.to_string(), s.to_string());
            } else {
                annotations.remove(STATE_ANNOTATION);
                tracing::warn!(
                    bytes = s.len(),
                    "the fleet's state is too large for the Lease; a new leader would start its tally afresh (follow fewer pods per controller, or aggregate with Prometheus)"
                );
            }
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(Role::Leader { took_over })
            }
            Err(e) if conflict(&e) => Ok(Role::Follower { holder }),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown), so another replica takes over at once.
    pub async fn release(&mut self) {
        if !self.leading {
            return;
        }
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str())
        {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await;
        }
        self.leading = false;
    }
}
