//! A multi-queue card's control queue (virtio spec 1.2, 5.1.6.5), and the queue pairs it
//! switches on and off.
//!
//! A card with several queue pairs (`--net tap=NAME,queues=N`) offers VIRTIO_NET_F_MQ and
//! VIRTIO_NET_F_CTRL_VQ: its last queue carries the driver's commands. Linux sends one as soon
//! as the card is up, `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` with one pair per vCPU, and again on
//! `ethtool -L eth0 combined K`. Until then only the first pair is in use (the spec says so),
//! and a pair past the driver's count gets no frames: its queue of the multi-queue tap is
//! detached ([`QueuePairs::set_active`]), so the kernel steers no flow to it, and its worker
//! stops watching it (told by a kick of its receive queue).
//!
//! Every command is the guest's to forge. A chain is a header (class, command), the command's
//! data, then one writable byte for the answer; anything else (no answer byte, data after it,
//! a buffer outside memory, a loop, a class or command we don't offer, a pair count of 0 or
//! past the card's) fails that command alone: the answer is VIRTIO_NET_ERR where there is room
//! for one, and the chain goes back used. The card and its other queues carry on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use crate::virtio::queue::{interrupt_if_wanted, next_chain, serve_until_idle, Chain, Pass, QueueError};
use crate::virtio::{ActiveQueue, Signals};

/// The most bytes of a command we read: a header and a pair count need 4; commands we don't
/// offer (MAC tables) may be longer, and are refused by their header alone.
const MAX_COMMAND_LEN: usize = 64;

/// A command the card carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use this many queue pairs.
    SetQueuePairs(u16),
}

/// Why a command fails (the driver hears VIRTIO_NET_ERR, if it left room to hear anything).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadCommand {
    #[error("a control chain has no writable byte for the answer")]
    NoAnswerByte,
    #[error("a control chain has readable data after its answer byte")]
    DataAfterAnswer,
    #[error("a control buffer lies outside guest memory")]
    OutsideMemory,
    #[error("a control chain loops or names a descriptor outside its table")]
    CutShort,
    #[error("a control command shorter than its header")]
    TooShort,
    #[error("control class {class}, command {command} is not one this card offers")]
    Unsupported { class: u8, command: u8 },
    #[error("the driver asked for {asked} queue pairs; this card has 1 to {max}")]
    PairsOutOfRange { asked: u16, max: u16 },
    #[error("the driver did not accept VIRTIO_NET_F_MQ, so it may not set queue pairs")]
    NoMultiqueue,
}

/// A control chain read: the command (or why it can't be carried out), and where its answer
/// goes (`None`: the driver left no room for one).
pub struct Request {
    pub command: Result<Command, BadCommand>,
    pub answer_at: Option<GuestAddress>,
}

/// Reads one control chain. `multiqueue`: the driver accepted VIRTIO_NET_F_MQ; `max_pairs`:
/// the card's queue pairs.
pub fn read_request(mem: &GuestMemoryMmap, chain: Chain<'_>, multiqueue: bool, max_pairs: u16) -> Request {
    let mut bytes = [0u8; MAX_COMMAND_LEN];
    let mut len = 0;
    let mut answer_at = None;
    let mut cut_short = false;
    let mut shape = Ok(());
    for descriptor in chain {
        cut_short = descriptor.has_next();
        if descriptor.is_write_only() {
            if answer_at.is_none() && descriptor.len() > 0 {
                answer_at = Some(descriptor.addr());
            }
            continue;
        }
        if answer_at.is_some() {
            shape = Err(BadCommand::DataAfterAnswer);
            continue;
        }
        let take = (descriptor.len() as usize).min(MAX_COMMAND_LEN - len);
        if mem.read_slice(&mut bytes[len..len + take], descriptor.addr()).is_err() {
            shape = Err(BadCommand::OutsideMemory);
        }
        len += take;
    }
    let command = if cut_short {
        Err(BadCommand::CutShort)
    } else if answer_at.is_none() {
        Err(BadCommand::NoAnswerByte)
    } else {
        shape.and_then(|()| parse(&bytes[..len], multiqueue, max_pairs))
    };
    Request { command, answer_at }
}

/// The command in a control chain's readable bytes.
fn parse(bytes: &[u8], multiqueue: bool, max_pairs: u16) -> Result<Command, BadCommand> {
    let [class, command, data @ ..] = bytes else { return Err(BadCommand::TooShort) };
    let (class, command) = (*class, *command);
    if u32::from(class) != VIRTIO_NET_CTRL_MQ || u32::from(command) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
        return Err(BadCommand::Unsupported { class, command });
    }
    if !multiqueue {
        return Err(BadCommand::NoMultiqueue);
    }
    let [low, high, ..] = data else { return Err(BadCommand::TooShort) };
    let asked = u16::from_le_bytes([*low, *high]);
    let allowed = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN as u16..=max_pairs.min(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX as u16);
    if !allowed.contains(&asked) {
        return Err(BadCommand::PairsOutOfRange { asked, max: max_pairs });
    }
    Ok(Command::SetQueuePairs(asked))
}

/// The byte the driver reads back.
pub fn answer(ok: bool) -> u8 {
    (if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR }) as u8
}

/// A multi-queue card's pairs: their tap queues, which are in use, and how to tell each pair's
/// worker that it changed (a kick of its receive queue). Shared by the pairs' workers.
pub struct QueuePairs {
    taps: Vec<Arc<Tap>>,
    active: Vec<AtomicBool>,
    /// Each pair's receive kick, written when the pair is switched; empty under vhost, which
    /// watches the taps itself.
    wake: Vec<EventFd>,
}

impl QueuePairs {
    /// The pairs of a card on these tap queues, all in use until [`QueuePairs::set_active`].
    pub fn new(taps: Vec<Arc<Tap>>, wake: Vec<EventFd>) -> QueuePairs {
        let active = taps.iter().map(|_| AtomicBool::new(true)).collect();
        QueuePairs { taps, active, wake }
    }

    pub fn is_active(&self, pair: usize) -> bool {
        self.active.get(pair).is_some_and(|active| active.load(Ordering::SeqCst))
    }

    /// How many pairs are in use.
    pub fn active_count(&self) -> usize {
        self.active.iter().filter(|active| active.load(Ordering::SeqCst)).count()
    }

    /// Uses the first `count` pairs and no others: their tap queues attached, the rest
    /// detached. A pair being switched off is marked first (so that its worker takes the
    /// detached queue's error as "stop watching"), one being switched on last (so that its
    /// worker watches a queue already attached). Fails when the tap refuses; the pairs
    /// switched before that stay switched.
    pub fn set_active(&self, count: usize) -> std::io::Result<()> {
        for (pair, tap) in self.taps.iter().enumerate() {
            let wanted = pair < count;
            if wanted == self.is_active(pair) {
                continue;
            }
            if !wanted {
                self.active[pair].store(false, Ordering::SeqCst);
            }
            tap.set_queue_enabled(wanted)?;
            if wanted {
                self.active[pair].store(true, Ordering::SeqCst);
            }
            if let Some(kick) = self.wake.get(pair) {
                kick.write(1)?;
            }
        }
        Ok(())
    }
}

/// The control queue, served on the first pair's worker.
pub struct Control {
    pub queue: ActiveQueue,
    /// Its index among the card's queues (the last), for its interrupt.
    pub index: usize,
    /// The driver accepted VIRTIO_NET_F_MQ.
    pub multiqueue: bool,
    pub pairs: Arc<QueuePairs>,
}

impl Control {
    /// Carries out every command the driver queued, answers each, and interrupts once.
    pub fn serve(&mut self, mem: &GuestMemoryMmap, signals: &Signals) -> Result<(), QueueError> {
        let Control { queue, index, multiqueue, pairs } = self;
        let max_pairs = u16::try_from(pairs.taps.len()).unwrap_or(u16::MAX);
        let pass = serve_until_idle(&mut queue.queue, mem, |queue| {
            let mut served = 0;
            while let Some(chain) = next_chain(queue, mem)? {
                let head = chain.head_index();
                let request = read_request(mem, chain, *multiqueue, max_pairs);
                let ok = request.command.map_err(|why| tracing::debug!("refused a control command: {why}")).is_ok_and(|command| carry_out(command, pairs));
                let answered = request.answer_at.is_some_and(|at| mem.write_obj(answer(ok), at).is_ok());
                queue.add_used(mem, head, u32::from(answered))?;
                served += 1;
            }
            Ok::<_, QueueError>(Pass::Drained(served))
        })?;
        interrupt_if_wanted(&mut queue.queue, mem, signals, *index, pass.served())
    }
}

/// Whether the command was carried out; a tap that refuses is the host's failure, logged.
fn carry_out(command: Command, pairs: &QueuePairs) -> bool {
    match command {
        Command::SetQueuePairs(count) => match pairs.set_active(usize::from(count)) {
            Ok(()) => {
                tracing::debug!("the driver uses {count} queue pairs");
                true
            }
            Err(e) => {
                tracing::warn!("the tap would not switch to {count} queue pairs: {e}");
                false
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: [u8; 2] = [VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8];

    fn command(pairs: u16) -> Vec<u8> {
        [&SET[..], &pairs.to_le_bytes()].concat()
    }

    #[test]
    fn a_pair_count_within_the_card_is_a_command() {
        assert_eq!(parse(&command(1), true, 4), Ok(Command::SetQueuePairs(1)));
        assert_eq!(parse(&command(4), true, 4), Ok(Command::SetQueuePairs(4)));
    }

    #[test]
    fn hostile_commands_fail_alone_with_a_reason() {
        assert_eq!(parse(&command(0), true, 4), Err(BadCommand::PairsOutOfRange { asked: 0, max: 4 }));
        assert_eq!(parse(&command(5), true, 4), Err(BadCommand::PairsOutOfRange { asked: 5, max: 4 }));
        assert_eq!(parse(&command(u16::MAX), true, 4), Err(BadCommand::PairsOutOfRange { asked: u16::MAX, max: 4 }));
        assert_eq!(parse(&command(2), false, 4), Err(BadCommand::NoMultiqueue));
        assert_eq!(parse(&SET, true, 4), Err(BadCommand::TooShort), "no pair count");
        assert_eq!(parse(&SET[..1], true, 4), Err(BadCommand::TooShort));
        assert_eq!(parse(&[], true, 4), Err(BadCommand::TooShort));
        // The receive filter (class 0) and MAC table (class 1) classes are not offered.
        assert_eq!(parse(&[0, 0, 1], true, 4), Err(BadCommand::Unsupported { class: 0, command: 0 }));
        assert_eq!(parse(&[VIRTIO_NET_CTRL_MQ as u8, 1, 2, 0], true, 4), Err(BadCommand::Unsupported { class: 4, command: 1 }));
    }

    #[test]
    fn the_answer_bytes_are_the_specs() {
        assert_eq!((answer(true), answer(false)), (0, 1));
    }

    #[test]
    fn switching_pairs_marks_them_and_wakes_their_workers() {
        let taps = (0..3).map(|_| Arc::new(Tap::socket_pair().expect("socketpair").0)).collect();
        let wake: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
        let woken: Vec<EventFd> = wake.iter().map(|kick| kick.try_clone().expect("clone")).collect();
        let pairs = QueuePairs::new(taps, wake);
        assert_eq!(pairs.active_count(), 3);
        pairs.set_active(1).expect("switch");
        assert_eq!((pairs.is_active(0), pairs.is_active(1), pairs.is_active(2)), (true, false, false));
        assert!(woken[0].read().is_err(), "pair 0 did not change: not woken");
        assert_eq!((woken[1].read().ok(), woken[2].read().ok()), (Some(1), Some(1)));
        pairs.set_active(2).expect("switch");
        assert_eq!(pairs.active_count(), 2);
        assert!(!pairs.is_active(7), "a pair the card doesn't have is not in use");
    }
}
